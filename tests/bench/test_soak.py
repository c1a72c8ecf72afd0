"""The soak runs every class of traffic through the real gate and judges each one's answers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from bench import soak
from demo import procs

pytestmark = [
    pytest.mark.bench,
    pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed"),
]


@pytest.mark.timeout(150)  # about 20 s of traffic and 10 s of start-up
def test_a_short_soak_gets_every_class_its_statuses_and_samples_memory() -> None:
    done = subprocess.run(
        [sys.executable, "bench/soak.py", "--minutes", "0.33", "--round", "10",
         "--warmup", "4", "--sample", "1"],
        cwd=procs.ROOT,
        capture_output=True,
        text=True,
        timeout=140,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.splitlines()[-1]
    assert last.startswith(soak.MARKER)
    result = json.loads(last[len(soak.MARKER) :])
    classes = result["classes"]
    assert set(classes) == {
        "valid", "scope", "unknown", "revoked", "revoking", "rate_limited", "hostile_path",
        "hostile_me", "dropped_header", "hostile_header", "overlong_uri", "many_headers",
    }  # fmt: skip
    assert result["fivexx"] == 0 and result["failures"] == []
    for name, statuses in classes.items():
        assert sum(statuses.values()) > 0, name
    # A key revoked halfway through a round was let through before, and refused after.
    assert classes["revoking"]["200"] > 0 and classes["revoking"]["401"] > 0
    assert result["probes"] == {"401": 2 * soak.PROBES}
    assert classes["rate_limited"]["429"] > classes["rate_limited"]["200"] > 0
    assert result["seconds"] >= 18
    for name in ("sidecar", "loader"):
        memory = result["memory"][name]
        assert 10 < memory["start"] <= memory["peak"] and memory["end"] <= memory["peak"], memory
    print(done.stdout)
