"""Wacrm's route table, as the sidecar reads it, for the upstream apps and the test."""

from __future__ import annotations

from sidecar.routes import Route, load_policy

#: Routes Wacrm serves that an older wacrm.routes may lack.
EXTRA = (
    Route("POST", "/api/v1/flows/{id}/runs", "flows:execute"),
    Route("GET", "/api/v1/flows/{id}/runs/{runId}", "flows:execute"),
)


def routes() -> list[Route]:
    """Return the sidecar's default routes, plus those of `EXTRA` it does not list."""
    table = list(load_policy().routes)
    listed = {(r.method, r.template) for r in table}
    return table + [r for r in EXTRA if (r.method, r.template) not in listed]


def routes_file() -> str:
    """Return `routes()` in the route file format, for the sidecar's WACRM_ROUTES."""
    return "".join(f"{r.method} {r.template} {r.scope or '-'}\n" for r in routes())


def dispatched(name: str, route: Route | None, status: int = 200) -> dict[str, object]:
    """Return the JSON body an upstream answers with: which route it dispatched to, if any."""
    if route is None:
        return {"upstream": name, "route": None, "status": status}
    return {"upstream": name, "route": route.template, "method": route.method}
