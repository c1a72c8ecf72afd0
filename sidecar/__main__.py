"""``python -m sidecar``: serve the verifier."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Sequence

from sidecar.logs import log_config
from sidecar.options import SettingError
from sidecar.routes import PolicyError, load_policy
from sidecar.server import serve, supervise
from sidecar.settings import Settings


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sidecar until SIGINT or SIGTERM; return the exit status."""
    try:
        settings = Settings.from_env(os.environ, sys.argv[1:] if argv is None else argv)
        policy = load_policy(settings.routes)
    except (SettingError, PolicyError) as e:
        print(f"wacrm-sidecar: {e}", file=sys.stderr)
        return 2
    log_config(settings.log_level)
    # What is loaded by now lives as long as the process: keep the collector off it, so that
    # exiting on SIGTERM does not walk it.
    gc.freeze()
    if settings.workers == 1:
        serve(settings, policy)
        return 0
    return supervise(settings, policy)


if __name__ == "__main__":
    sys.exit(main())
