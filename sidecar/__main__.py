"""``python -m sidecar``: serve the verifier."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from aiohttp import web

from sidecar.app import create_app
from sidecar.logs import log_config
from sidecar.options import SettingError
from sidecar.routes import PolicyError
from sidecar.settings import Settings

log = logging.getLogger("sidecar")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sidecar until SIGINT or SIGTERM; return the exit status."""
    try:
        settings = Settings.from_env(os.environ, sys.argv[1:] if argv is None else argv)
        app = create_app(settings)
    except (SettingError, PolicyError) as e:
        print(f"wacrm-sidecar: {e}", file=sys.stderr)
        return 2
    log_config(settings.log_level)
    _use_uvloop()
    log.info("listening on %s:%d", settings.host, settings.port)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        print=None,
        access_log=None,
        shutdown_timeout=5.0,
    )
    return 0


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


if __name__ == "__main__":
    sys.exit(main())
