"""Wacrm's route table on aiohttp's own router (web.Application), served by web.run_app."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable

from aiohttp import web

from sidecar.routes import Route
from tests.routers.table import dispatched, routes

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def handler(route: Route) -> Handler:
    async def handle(_: web.Request) -> web.Response:
        return web.json_response(dispatched("aiohttp", route))

    return handle


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        return web.json_response(dispatched("aiohttp", None, e.status), status=e.status)


def main() -> None:
    app = web.Application(middlewares=[json_errors])
    for route in routes():
        app.router.add_route(route.method, route.template, handler(route))
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
