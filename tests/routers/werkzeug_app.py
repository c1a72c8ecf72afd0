"""Wacrm's route table on Werkzeug's routing (werkzeug.routing.Map), served by its own server."""

from __future__ import annotations

import logging
import re
import sys

import orjson
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, RequestRedirect, Rule
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from tests.routers.table import dispatched, routes

ROUTES = routes()
MAP = Map(
    [
        Rule(re.sub(r"\{(\w+)\}", r"<\1>", r.template), methods=[r.method], endpoint=i)
        for i, r in enumerate(ROUTES)
    ]
)


def answer(body: dict[str, object], status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, mimetype="application/json")


@Request.application
def app(request: Request) -> Response:
    try:
        endpoint, _ = MAP.bind_to_environ(request.environ).match()
    except RequestRedirect as e:  # a slash merged or added: the client is sent elsewhere
        return answer({"upstream": "werkzeug", "route": None, "redirect": e.new_url}, e.code)
    except HTTPException as e:
        return answer(dispatched("werkzeug", None, e.code or 500), e.code or 500)
    return answer(dispatched("werkzeug", ROUTES[endpoint]))


def main() -> None:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    make_server("127.0.0.1", int(sys.argv[1]), app, threaded=True).serve_forever()


if __name__ == "__main__":
    main()
