"""Upstream apps serving Wacrm's route table with real routers, for tests/e2e/test_routers.py."""
