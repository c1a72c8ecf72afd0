# The Wacrm gate's sidecar and loader in one image.
#   docker build -t wacrm-gate .
#   docker run -e WACRM_HOST=0.0.0.0 -e WACRM_REDIS_URL=redis://redis:6379/0 -p 9180:9180 wacrm-gate
#   docker run -e WACRM_SOURCE=postgresql://... -e WACRM_REDIS_URL=... wacrm-gate wacrm-loader run
# Not yet built in CI: this machine has no container engine (a later issue brings podman).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
COPY loader ./loader
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 --no-create-home gate
USER 10001
ENV WACRM_HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1
EXPOSE 9180
HEALTHCHECK --interval=10s --timeout=2s CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:9180/healthz', timeout=2).status != 200)"]
STOPSIGNAL SIGTERM
CMD ["wacrm-sidecar"]
