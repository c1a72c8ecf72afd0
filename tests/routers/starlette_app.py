"""Wacrm's route table on Starlette's own router, served by uvicorn."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as StarletteRoute

from sidecar.routes import Route
from tests.routers.table import dispatched, routes


def endpoint(route: Route) -> Callable[[Request], Awaitable[Response]]:
    async def handle(_: Request) -> Response:
        return JSONResponse(dispatched("starlette", route))

    return handle


async def json_error(_: Request, e: Exception) -> Response:
    status = e.status_code if isinstance(e, HTTPException) else 500
    return JSONResponse(dispatched("starlette", None, status), status_code=status)


def main() -> None:
    app = Starlette(
        routes=[StarletteRoute(r.template, endpoint(r), methods=[r.method]) for r in routes()],
        exception_handlers={404: json_error, 405: json_error},
    )
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
