"""``python -m demo``: the whole gate on this machine, on the embedded defaults.

Local redis-server, nginx with the shipped config, the sidecar, the loader following an SQLite
key table, and an echoing upstream; then a freshly minted key and a curl line that works.
nginx asks the sidecar, and the sidecar and the loader ask Redis, over Unix sockets, as on
any single host.  Everything lives under
.run/demo and stops on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

from demo import procs

RUN = procs.ROOT / ".run" / "demo"


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__)
    parser.add_argument("--port", type=int, default=8080, help="nginx's port (default 8080)")
    args = parser.parse_args()
    RUN.mkdir(parents=True, exist_ok=True)
    nginx_port = args.port if _free(args.port) else procs.free_port()
    # In the work folder, unless nginx's workers could not reach it there.
    sockets = procs.socket_folder(RUN)
    redis = procs.redis_server(RUN, unix_socket=sockets / "redis.sock")
    redis_url = f"unix://{sockets / 'redis.sock'}?db=0"
    env = {
        **os.environ,
        "WACRM_REDIS_URL": redis_url,
        "WACRM_SOURCE": f"sqlite:///{RUN / 'keys.db'}",
    }
    sidecar = procs.sidecar(RUN, redis_url=redis_url, unix_socket=sockets / "sidecar.sock")
    upstream = procs.upstream(RUN)
    nginx = procs.nginx(
        RUN, sidecar_socket=sidecar.unix_socket, upstream_port=upstream.port, port=nginx_port
    )
    loader = procs.Process(
        [sys.executable, "-m", "loader", "run"], port=0, log=RUN / "loader.log", env=env
    )
    running: list[procs.Process] = []
    try:
        for p in (redis, sidecar, upstream, nginx):
            p.start()
            running.append(p)
        account = _loader(env, "accounts", "create", "Acme Inc")
        key = _loader(
            env,
            "keys",
            "create",
            "--account",
            account,
            "--name",
            "demo",
            "--scope",
            "contacts:read",
            "--scope",
            "messages:send",
        )
        loader.start_background()
        running.append(loader)
        _banner(nginx_port, key, env, sidecar.address)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while all(p.running for p in running):
            time.sleep(0.5)
        dead = [p.argv[0] for p in running if not p.running]
        print(f"demo: {dead} stopped; see the logs in {RUN}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for p in reversed(running):
            p.stop()
        if sockets != RUN:
            shutil.rmtree(sockets, ignore_errors=True)


def _loader(env: dict[str, str], *args: str) -> str:
    """Run a loader command and return the last line it printed."""
    out = subprocess.run(
        [sys.executable, "-m", "loader", *args], env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"demo: loader {' '.join(args[:2])} failed:\n{out.stderr}")
    return out.stdout.strip().splitlines()[-1].split()[-1]


def _free(port: int) -> bool:
    try:
        procs.wait_for_port(port, timeout=0.05)
    except TimeoutError:
        return True
    return False


def _banner(port: int, key: str, env: dict[str, str], sidecar: str) -> None:
    base = f"http://127.0.0.1:{port}"
    loader = " ".join(
        f"{name}={shlex.quote(env[name])}" for name in ("WACRM_SOURCE", "WACRM_REDIS_URL")
    )
    print(
        f"""
The Wacrm gate is running (logs in {RUN}; nginx asks the sidecar on {sidecar}).

A demo key with the scopes contacts:read and messages:send (shown once, stored only hashed):
    {key}

Try it:
    curl -i {base}/api/v1/me -H "Authorization: Bearer {key}"
    curl -i {base}/api/v1/contacts -H "Authorization: Bearer {key}"
    curl -i {base}/api/v1/webhooks -H "Authorization: Bearer {key}"      # 403: no scope
    curl -i {base}/api/v1/contacts                                       # 401: no key

Manage keys (the loader follows the table within a second):
    {loader} .venv/bin/python -m loader keys list
    {loader} .venv/bin/python -m loader keys revoke KEY_ID

Ctrl-C stops everything.""",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
