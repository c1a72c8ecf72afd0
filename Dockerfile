# The Wacrm gate's sidecar and loader in one image, installed in a virtual environment at
# /opt/wacrm with the versions pinned in constraints.txt.
#   podman build --format docker -t wacrm-gate .        (or docker build -t wacrm-gate .)
#   podman build --format docker --build-arg BASE=localhost/debian-python3-venv -t wacrm-gate .
# BASE is any Debian-like image with python3 (3.11+) and its venv module: python:3.11-slim
# (the default), or Debian with python3 and python3-venv (what .ci/image builds on).
#   podman run -e WACRM_REDIS_URL=redis://redis:6379/0 -p 9180:9180 wacrm-gate
#   podman run -v wacrm-data:/data -e WACRM_SOURCE=sqlite:////data/keys.db \
#       -e WACRM_REDIS_URL=redis://redis:6379/0 wacrm-gate wacrm-loader run
# --format docker keeps the HEALTHCHECK (podman's default OCI format drops it).
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
# Lets .ci/image find this stage's old, untagged images and remove them.
LABEL org.wacrm-gate.stage=build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY constraints.txt ./
# The pinned pip first: the base's may be too old for --build-constraint.
RUN python3 -m venv /opt/wacrm \
    && /opt/wacrm/bin/python -m pip install --no-cache-dir -c constraints.txt --upgrade pip
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
COPY loader ./loader
# The build backend is pinned too (--build-constraint); pip and setuptools then leave the
# venv, which needs neither to run.
RUN /opt/wacrm/bin/python -m pip install --no-cache-dir -c constraints.txt \
        --build-constraint constraints.txt . \
    && /opt/wacrm/bin/python -m pip uninstall -y -q pip setuptools \
    && /opt/wacrm/bin/wacrm-sidecar --help >/dev/null \
    && /opt/wacrm/bin/wacrm-loader --help >/dev/null
COPY container/healthcheck.py /opt/wacrm/bin/wacrm-healthcheck
RUN chmod 0755 /opt/wacrm/bin/wacrm-healthcheck

FROM ${BASE}
COPY --from=build /opt/wacrm /opt/wacrm
# uid and gid 10001; /data belongs to it, for the loader's SQLite file on standalone installs,
# and /run/wacrm, for the sidecar's socket (WACRM_LISTEN=unix:/run/wacrm/sidecar.sock) on a
# volume shared with nginx's container: a named volume mounted there takes this ownership.
RUN groupadd --gid 10001 gate \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin --no-log-init gate \
    && mkdir -m 0750 /data \
    && mkdir -p -m 0755 /run/wacrm \
    && chown 10001:10001 /data /run/wacrm
ENV PATH=/opt/wacrm/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    VIRTUAL_ENV=/opt/wacrm \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    WACRM_HOST=0.0.0.0 \
    WACRM_LOADER_METRICS_HOST=0.0.0.0 \
    WACRM_LOADER_METRICS_PORT=9181
VOLUME ["/data"]
WORKDIR /data
USER 10001:10001
# 9180: the sidecar (WACRM_PORT); 9181: the metrics and health of `wacrm-loader run`.
EXPOSE 9180 9181
# Asks the process this container runs (sidecar or `loader run`) on its own host and port.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 CMD ["wacrm-healthcheck"]
STOPSIGNAL SIGTERM
CMD ["wacrm-sidecar"]
