"""Settings read from ``WACRM_*`` environment variables and command-line flags.

Each process declares its settings once, as `Option`s; from that list come the frozen
settings object, the ``--help`` text and the errors that name the variable at fault.
"""

from __future__ import annotations

import argparse
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self


class SettingError(ValueError):
    """A setting has a value the process cannot start with."""


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: its field name, environment variable, flag, parser, default and help."""

    name: str
    env: str
    parse: Callable[[str], Any]
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def read(
    options: Sequence[Option], environ: Mapping[str, str], flags: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Return each option's value: from *flags* (option name -> raw value), else *environ*,
    else its default.

    Raise `SettingError` naming the flag or variable whose value does not parse.
    """
    values: dict[str, Any] = {}
    flags = flags or {}
    for opt in options:
        if opt.name in flags:
            raw, origin = flags[opt.name], opt.flag
        elif opt.env in environ:
            raw, origin = environ[opt.env], opt.env
        else:
            values[opt.name] = opt.default
            continue
        try:
            values[opt.name] = opt.parse(raw)
        except (ValueError, TypeError) as e:
            raise SettingError(f"{origin}={redact_url(raw)!r}: {e}") from None
    return values


def add_flags(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    """Give *parser* a flag for each of *options*; a flag not given is absent from the result."""
    for opt in options:
        default = "unset" if opt.default is None else opt.default
        parser.add_argument(
            opt.flag,
            dest=opt.name,
            metavar="VALUE",
            default=argparse.SUPPRESS,
            help=f"{opt.help} [env {opt.env}, default {default}]",
        )


class FromEnv:
    """A settings class read from its `OPTIONS`: environment variables, then flags."""

    __slots__ = ()
    OPTIONS: ClassVar[Sequence[Option]]
    #: The program's name and what it does, for ``--help``.
    PROG: ClassVar[str]
    DESCRIPTION: ClassVar[str]

    @classmethod
    def from_env(cls, environ: Mapping[str, str], argv: Sequence[str] | None = None) -> Self:
        """Read settings from *environ*, overridden by the flags in *argv*."""
        flags: dict[str, str] = {}
        if argv is not None:
            parser = argparse.ArgumentParser(
                prog=cls.PROG,
                description=cls.DESCRIPTION,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
            add_flags(parser, cls.OPTIONS)
            flags = vars(parser.parse_args(argv))
        return cls.from_flags(environ, flags)

    @classmethod
    def from_flags(cls, environ: Mapping[str, str], flags: Mapping[str, Any]) -> Self:
        """Read settings from *environ*, overridden by *flags* parsed already (`add_flags`)."""
        names = {opt.name for opt in cls.OPTIONS}
        return cls(**read(cls.OPTIONS, environ, {k: v for k, v in flags.items() if k in names}))


def redact_url(url: str) -> str:
    """Return *url* without its user and password, if it is a URL that has them."""
    scheme, sep, rest = url.partition("://")
    _, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{'***@' if at else ''}{host}" if sep else url


def positive_float(raw: str) -> float:
    """Parse a number greater than zero."""
    value = float(raw)
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a number greater than 0")
    return value


def port(raw: str) -> int:
    """Parse a TCP port number."""
    value = int(raw)
    if not 0 < value < 65536:
        raise ValueError("must be a port number from 1 to 65535")
    return value


def positive_int(raw: str) -> int:
    """Parse a whole number greater than zero."""
    value = int(raw)
    if value < 1:
        raise ValueError("must be a whole number of at least 1")
    return value


_REDIS_URL_FORMS = "redis://HOST[:PORT][/DB], rediss://HOST[:PORT][/DB] or unix:///PATH[?db=DB]"


def redis_url(raw: str) -> str:
    """Check a Redis URL, as the Redis clients will read it, and return it unchanged."""
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"must be {_REDIS_URL_FORMS}")
    url = urllib.parse.urlsplit(raw)
    try:
        port = url.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("the port must be a number from 1 to 65535")
    db = urllib.parse.parse_qs(url.query).get("db", [""])[0]
    if url.scheme == "unix":
        if url.hostname or not url.path:
            raise ValueError("must be unix:///PATH[?db=DB], with the socket's absolute path")
    else:
        if not url.hostname:
            raise ValueError(f"names no host: must be {_REDIS_URL_FORMS}")
        db = db or url.path.strip("/")
    if db and not (db.isascii() and db.isdigit()):
        raise ValueError(f"the database must be a whole number, not {db!r}")
    return raw


def choice(*allowed: str) -> Callable[[str], str]:
    """Return a parser accepting one of *allowed*, case-insensitively."""

    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return parse


#: The log level setting, the same in every process.
LOG_LEVEL = Option(
    "log_level",
    "WACRM_LOG_LEVEL",
    choice("debug", "info", "warning", "error"),
    "info",
    "log level: debug, info, warning or error",
)
