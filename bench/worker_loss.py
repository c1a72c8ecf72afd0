"""Count the connections lost when a sidecar worker dies under load.

Run ``.venv/bin/python -m bench.worker_loss --kills 8``.  It starts its own redis-server and
a sidecar with two workers, has 4 clients open a new connection for every ``/healthz``
request, kills one worker with SIGKILL every 2.5 s (the supervisor starts another), and prints
how the requests ended.  Compare runs with ``sysctl net.ipv4.tcp_migrate_req`` at 0 and 1.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from demo import procs

CLIENTS = 4


def main(argv: Sequence[str] | None = None) -> int:
    """Run the kills and print the outcome counts; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=8, help="workers to kill (default 8)")
    args = parser.parse_args(argv)
    migrate = Path("/proc/sys/net/ipv4/tcp_migrate_req")
    setting = migrate.read_text().strip() if migrate.exists() else "absent"
    with tempfile.TemporaryDirectory(prefix="wacrm-bench-") as tmp:
        redis = procs.redis_server(Path(tmp))
        redis.start()
        sidecar = procs.sidecar(
            Path(tmp),
            redis_url=f"redis://127.0.0.1:{redis.port}/0",
            extra_env={"WACRM_WORKERS": "2"},
        )
        try:
            sidecar.start()
            time.sleep(1.5)  # both workers listening
            outcomes = _kill_under_load(sidecar, args.kills)
        finally:
            sidecar.stop()
            redis.stop()
    print(f"net.ipv4.tcp_migrate_req = {setting}; {args.kills} workers killed")
    for outcome, n in sorted(outcomes.items()):
        print(f"  {outcome}: {n:,}")
    return 0


def _kill_under_load(sidecar: procs.Process, kills: int) -> Counter[str]:
    assert sidecar.proc is not None and sidecar.port is not None
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            outcome = _one_request(sidecar.port)  # type: ignore[arg-type]
            with lock:
                outcomes[outcome] += 1

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        for _ in range(kills):
            time.sleep(1.0)
            workers = subprocess.run(
                ["pgrep", "-P", str(sidecar.proc.pid), "-f", "spawn_main"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.split()
            if workers:
                os.kill(int(workers[0]), signal.SIGKILL)
            time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return outcomes


def _one_request(port: int) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: gate\r\nConnection: close\r\n\r\n")
            head = s.recv(64)
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "timed out"
    if head.startswith(b"HTTP/1.1 200"):
        return "200"
    return "closed without an answer" if not head else "other answer"


if __name__ == "__main__":
    sys.exit(main())
