"""Processes for the demo stack and the end-to-end tests: Redis, nginx, sidecar, upstream."""
