"""The benchmark harness's tests: they start real servers and wrk, so they carry a marker."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "bench: drives the benchmark harness (wrk, nginx, Redis); deselect with -m"
    )
