"""Make deploy/compose/nginx.conf, compose.yaml's nginx configuration, from nginx/nginx.conf.

The shipped config is used as is: only its @NAME@ placeholders are filled in, with the
addresses and paths of the compose stack (the sidecar and the demo upstream by service name,
the snippets where compose.yaml mounts them), and its two log files become the container's
stdout and stderr.  tests/deploy/test_compose.py fails when the file differs from this
rendering, so the two cannot drift:

    .venv/bin/python deploy/compose/render_nginx.py           # write deploy/compose/nginx.conf
    .venv/bin/python deploy/compose/render_nginx.py --check   # exit 1 if it is out of date
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "nginx" / "nginx.conf"
RENDERED = ROOT / "deploy" / "compose" / "nginx.conf"

#: Where compose.yaml mounts nginx/snippets (as $NGINX_DIR/snippets).
NGINX_DIR = "/etc/nginx/wacrm"
#: The sidecar's and the demo upstream's service names and ports in compose.yaml.
SIDECAR = "sidecar:9180"
UPSTREAM = "upstream:8000"
#: nginx's port inside its container; compose.yaml publishes it on the host.
LISTEN = "80"
#: The pid file and the temp folders' parent; compose.yaml mounts a tmpfs on
#: /run/nginx-tmp, which nginx needs to exist.
RUNDIR = "/run"

#: Done first, in this order: the log files, then every placeholder.
REPLACEMENTS = (
    ("@RUNDIR@/nginx-error.log", "/dev/stderr"),
    ("@RUNDIR@/nginx-access.log", "/dev/stdout"),
    ("@RUNDIR@", RUNDIR),
    ("@NGINX_DIR@", NGINX_DIR),
    ("@LISTEN@", LISTEN),
    ("@SIDECAR@", SIDECAR),
    ("@UPSTREAM@", UPSTREAM),
)

HEADER = """\
# GENERATED from nginx/nginx.conf by deploy/compose/render_nginx.py: do not edit, run it.
# compose.yaml's nginx: the shipped config with the compose stack's addresses (the sidecar
# and the demo upstream by service name), the snippets mounted at /etc/nginx/wacrm/snippets,
# the logs on the container's stdout and stderr.
"""


def render(shipped: str) -> str:
    """Return the compose stack's nginx.conf made from the shipped one's text."""
    lines = shipped.splitlines(keepends=True)
    # The shipped file's opening comment (about the demo's placeholders) gives way to ours.
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    text = HEADER + "".join(lines)
    for old, new in REPLACEMENTS:
        text = text.replace(old, new)
    left = sorted(set(re.findall(r"@[A-Z_]+@", text)))
    if left:
        raise ValueError(f"nginx/nginx.conf has placeholders this does not fill: {left}")
    return text


def main(argv: list[str]) -> int:
    want = render(SHIPPED.read_text())
    if argv[1:] == ["--check"]:
        if not RENDERED.exists() or RENDERED.read_text() != want:
            print(f"{RENDERED.relative_to(ROOT)} is out of date: run {argv[0]}", file=sys.stderr)
            return 1
        return 0
    if argv[1:]:
        print(__doc__, file=sys.stderr)
        return 2
    RENDERED.write_text(want)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
