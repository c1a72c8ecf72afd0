"""Wacrm's route table, as the sidecar reads it, for the upstream apps and the test."""

from __future__ import annotations

from sidecar.routes import Route, load_policy


def routes() -> list[Route]:
    """Return the sidecar's default routes: Wacrm's table."""
    return list(load_policy().routes)


def dispatched(name: str, route: Route | None, status: int = 200) -> dict[str, object]:
    """Return the JSON body an upstream answers with: which route it dispatched to, if any."""
    if route is None:
        return {"upstream": name, "route": None, "status": status}
    return {"upstream": name, "route": route.template, "method": route.method}
