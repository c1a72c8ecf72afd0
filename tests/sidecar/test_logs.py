"""JSON log lines."""

from __future__ import annotations

import io
import logging

import orjson

from sidecar.logs import log_config


def test_log_config_writes_one_json_object_per_line_with_extras() -> None:
    out = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        log_config("info", stream=out)
        logging.getLogger("t").info("hello %s", "there", extra={"key_id": "k1"})
        logging.getLogger("t").debug("hidden")
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    rec = orjson.loads(lines[0])
    assert rec["msg"] == "hello there"
    assert rec["level"] == "info"
    assert rec["logger"] == "t"
    assert rec["key_id"] == "k1"
    assert rec["ts"].endswith("Z")
