"""The gate's benchmark harness: real nginx, real Redis, wrk; see ``bench/gate.py``."""
