"""``python -m loader`` / ``wacrm-loader``: sync, run, and manage accounts and keys."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, TextIO, TypeVar

import orjson

from loader import admin, runner
from loader.limits import LimitsError
from loader.metrics import MetricsUnavailable
from loader.mirror import REDIS_ERRORS
from loader.rules import RuleError
from loader.settings import OPTIONS, Settings
from loader.source import KeyListing, NotFound, SourceUnavailable
from sidecar.logs import log_config
from sidecar.options import SettingError, add_flags, redact_url
from sidecar.routes import PolicyError

log = logging.getLogger("loader")

T = TypeVar("T")

#: Exit statuses: done; failed; bad usage or settings; done in the table but not in Redis.
OK, FAILED, USAGE, REDIS_BEHIND = 0, 1, 2, 3
#: Seconds a stopped command may take to abandon its work and close its connections.
STOP_GRACE = 4.0

_LIST_COLUMNS = (
    "id",
    "name",
    "key_prefix",
    "scopes",
    "last_used_at",
    "expires_at",
    "revoked_at",
    "created_at",
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command in *argv* (default: the process's); return the exit status."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = Settings.from_flags(os.environ, vars(args))
        settings.require_source()
        runner.key_rules(settings)
    except (SettingError, PolicyError, LimitsError) as e:
        print(f"wacrm-loader: {e}", file=sys.stderr)
        return USAGE
    log_config(settings.log_level)
    gc.freeze()  # as the sidecar does: exiting on SIGTERM then skips what start-up loaded
    try:
        status: int = _dispatch(args, settings)
    except (RuleError, NotFound) as e:
        print(f"wacrm-loader: {e}", file=sys.stderr)
        return FAILED if isinstance(e, NotFound) else USAGE
    except (SourceUnavailable, MetricsUnavailable, *REDIS_ERRORS) as e:
        print(f"wacrm-loader: {e}", file=sys.stderr)
        return FAILED
    return status


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "sync":
        _run(runner.sync(settings))
        return OK
    if args.command == "run":
        log.info("loader running against %s", redact_url(settings.require_source()))
        _run(runner.run(settings), forever=True)
        return OK
    if args.command == "accounts":
        print(_run(admin.create_account(settings, args.name)))
        return OK
    if args.action == "create":
        created = _run(
            admin.create_key(
                settings,
                account_id=args.account,
                name=args.name,
                scopes=args.scope or (),
                expires_in_days=args.expires_in_days,
                created_by=args.created_by,
            )
        )
        if not created.in_redis:
            print(
                "wacrm-loader: Redis not reachable (see the warning above); the key works once"
                " the loader syncs it",
                file=sys.stderr,
            )
        print(f"id: {created.key.id}")
        print(f"prefix: {created.key.key_prefix}")
        print(created.plaintext, flush=True)
        return OK
    if args.action == "list":
        _print_keys(
            _run(admin.list_keys(settings, args.account)), as_json=args.json, out=sys.stdout
        )
        return OK
    in_redis = _run(admin.revoke_key(settings, args.key_id))
    if not in_redis:
        print(
            f"wacrm-loader: key {args.key_id} revoked in the table, but Redis could not be"
            " updated; it stays usable until the loader or Redis catches up",
            file=sys.stderr,
        )
        return REDIS_BEHIND
    print(f"revoked {args.key_id}")
    return OK


def _run(coro: Coroutine[Any, Any, T], *, forever: bool = False) -> T:
    """Run *coro* on uvloop when available, until done or stopped by SIGTERM or SIGINT.

    A signal cancels *coro*: its current batch is abandoned (every write to Redis carries
    a version, so a partial batch is harmless) and its connections closed, within
    STOP_GRACE seconds, or the process exits regardless.  A stopped `run` (*forever*)
    exits 0; any other command exits 128 + the signal's number.
    """
    try:
        import uvloop

        runner_cls: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        runner_cls = asyncio.run
    stopped_by: list[int] = []

    def status() -> int:
        return OK if forever else 128 + (stopped_by[0] if stopped_by else signal.SIGINT)

    async def main() -> T:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        def stop(signum: int) -> None:
            if stopped_by:  # a second signal: no more waiting
                _exit_now(status(), "stopped again")
            stopped_by.append(signum)
            log.info("stopping on %s", signal.Signals(signum).name)
            task.cancel()
            loop.call_later(STOP_GRACE, _exit_now, status(), f"not stopped in {STOP_GRACE} s")

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop, signum)
        return await coro

    try:
        result: T = runner_cls(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        if not forever:
            raise SystemExit(status()) from None
        log.info("loader stopped")
        return None  # type: ignore[return-value]  # only `run`, which returns nothing
    return result


def _exit_now(status: int, why: str) -> None:
    """Leave at once with *status*, connections and all: the last resort of a stop."""
    log.warning("%s; exiting without closing the connections", why)
    logging.shutdown()
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
    os._exit(status)


def _print_keys(keys: list[KeyListing], *, as_json: bool, out: TextIO) -> None:
    rows = [
        {
            "id": k.id,
            "name": k.name,
            "key_prefix": k.key_prefix,
            "scopes": list(k.scopes),
            "last_used_at": _time(k.last_used_at),
            "expires_at": _time(k.expires_at),
            "revoked_at": _time(k.revoked_at),
            "created_at": _time(k.created_at),
        }
        for k in keys
    ]
    if as_json:
        for row in rows:
            out.write(orjson.dumps(row).decode() + "\n")
        return
    out.write("\t".join(_LIST_COLUMNS) + "\n")
    for row in rows:
        cells = [",".join(v) if isinstance(v, list) else (v or "-") for v in row.values()]
        out.write("\t".join(str(c).replace("\t", " ").replace("\n", " ") for c in cells) + "\n")


def _time(moment: Any) -> str | None:
    return None if moment is None else moment.isoformat()


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    add_flags(common, OPTIONS)
    parser = argparse.ArgumentParser(
        prog="wacrm-loader",
        parents=[common],
        description="Keep the gate's Redis equal to the table of API keys, and manage keys.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("sync", parents=[common], help="one full reconcile, then exit")
    commands.add_parser(
        "run", parents=[common], help="reconcile, then follow changes until stopped"
    )

    accounts = commands.add_parser("accounts", parents=[common], help="manage accounts")
    account_actions = accounts.add_subparsers(dest="action", required=True, metavar="ACTION")
    create_account = account_actions.add_parser(
        "create", parents=[common], help="create an account; prints its id"
    )
    create_account.add_argument("name", help="the account's name")

    keys = commands.add_parser("keys", parents=[common], help="manage API keys")
    key_actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = key_actions.add_parser(
        "create", parents=[common], help="mint a key; prints the plaintext once, on the last line"
    )
    create.add_argument("--account", required=True, help="the account's id")
    create.add_argument(
        "--name", required=True, help="the key's name (trimmed, at most 80 characters)"
    )
    create.add_argument("--scope", action="append", help="a scope the key carries; repeat for more")
    create.add_argument(
        "--expires-in-days", type=int, help="lifetime in whole days, 1 to 365 (default: never)"
    )
    create.add_argument("--created-by", help="the id of the user minting the key")
    listing = key_actions.add_parser(
        "list", parents=[common], help="show keys, never their hash or plaintext"
    )
    listing.add_argument("--account", help="only this account's keys")
    listing.add_argument("--json", action="store_true", help="one JSON object a line")
    revoke = key_actions.add_parser(
        "revoke", parents=[common], help="revoke a key, in the table and in Redis"
    )
    revoke.add_argument("key_id", help="the key's id")
    return parser


if __name__ == "__main__":
    sys.exit(main())
