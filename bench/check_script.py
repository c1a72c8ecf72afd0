"""Price the request path's check script in Redis CPU, by the shape of its batches.

Run ``.venv/bin/python -m bench.check_script``.  It starts its own redis-server, stores a few
records, and sends the script pipelined calls of 9 checks each: all for one key, then for 9
different keys.  Redis's own count (INFO commandstats, which includes the commands the script
runs) gives the microseconds of Redis CPU per check; the best of 3 repeats is shown.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import redis as redis_sync

from demo import procs
from sidecar import records
from sidecar.records import KeyRecord, Keyspace

BATCH = 9
CALLS = 2000


def main(argv: Sequence[str] | None = None) -> int:
    """Print Redis CPU per check for a batch of one key and a batch of different keys."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args(argv)
    ks = Keyspace()
    record = KeyRecord(
        "5b0e9f7c-0000-4000-8000-000000000002",
        "7a1d6c1e-0000-4000-8000-000000000001",
        "Bench Inc",
        "wacrm_live_abcdefgh",
        ("contacts:read", "contacts:write", "messages:send"),
        None,
    )
    with tempfile.TemporaryDirectory(prefix="wacrm-bench-") as tmp:
        server = procs.redis_server(Path(tmp))
        server.start()
        try:
            r = redis_sync.Redis(port=server.port)
            hashes = [f"{i:064x}" for i in range(BATCH)]
            for h in hashes:
                r.set(ks.record(h), records.encode(record, version=1_700_000_000_000_000))
            r.set(ks.loaded, 1_700_000_000_000_000)  # a finished load, as the loader marks it
            sha = r.script_load(records.CHECK_SCRIPT)
            print(f"Redis CPU per check, {CALLS:,} calls of {BATCH} checks, best of 3:")
            for label, batch in (
                ("one key, 9 times", [hashes[0]] * BATCH),
                ("9 different keys", hashes),
            ):
                keys = [k for h in batch for k in (ks.record(h), ks.rate(h))] + [ks.loaded]
                best = min(_run(r, sha, keys) for _ in range(3))
                print(f"  {label}: {best:.2f} us")
        finally:
            server.stop()
    return 0


def _run(r: redis_sync.Redis, sha: str, keys: list[str]) -> float:
    """Return Redis's microseconds per check over CALLS pipelined calls."""
    r.config_resetstat()
    pipe = r.pipeline(transaction=False)
    for _ in range(CALLS):
        pipe.evalsha(sha, len(keys), *keys, 1_000_000_000, 1000)
    pipe.execute()
    usec = r.info("commandstats")["cmdstat_evalsha"]["usec"]
    return float(usec) / (CALLS * BATCH)


if __name__ == "__main__":
    sys.exit(main())
