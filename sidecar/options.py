"""Settings read from ``WACRM_*`` environment variables and command-line flags.

Each process declares its settings once, as `Option`s; from that list come the frozen
settings object, the ``--help`` text and the errors that name the variable at fault.
"""

from __future__ import annotations

import argparse
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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
    """Return *url* without its user and password, if it is a URL that has them.

    A query parameter whose name holds ``pass`` (``password=``, ``sentinel_password=``)
    loses its value and everything after it, so a password holding ``&`` stays hidden too.
    """
    url = _QUERY_PASSWORD.sub(r"\1***", url)
    scheme, sep, rest = url.partition("://")
    _, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{'***@' if at else ''}{host}" if sep else url


_QUERY_PASSWORD = re.compile(r"([?&][^?&=]*pass[^?&=]*=).*", re.IGNORECASE | re.DOTALL)


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


def redis_prefix(raw: str) -> str:
    """Parse the prefix of the gate's Redis keys: no braces, which would move a Cluster's slots."""
    if "{" in raw or "}" in raw:
        raise ValueError("may not hold { or }: the key hash is each Redis key's hash tag")
    return raw


_SENTINEL_FORM = "redis+sentinel://HOST[:PORT][,HOST[:PORT]...]/MASTER[/DB]"
_PLAIN_FORMS = "redis://HOST[:PORT][/DB], rediss://HOST[:PORT][/DB], unix:///PATH[?db=DB]"
_REDIS_URL_FORMS = f"{_PLAIN_FORMS} or {_SENTINEL_FORM}"
#: The URL schemes of a Redis found through Sentinel: plain, and TLS to sentinels and master.
SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
#: The port of a sentinel the URL names without one.
SENTINEL_PORT = 26379
_SENTINEL_QUERY = ("sentinel_username", "sentinel_password", "db")


def redis_url(raw: str) -> str:
    """Check a Redis URL, as the Redis clients will read it, and return it unchanged."""
    if raw.startswith(SENTINEL_SCHEMES):
        sentinel_target(raw)
        return raw
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


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """A Redis master found through Sentinel, as a ``redis+sentinel://`` URL names it."""

    #: The sentinels to ask (host, port), in the URL's order.
    sentinels: tuple[tuple[str, int], ...]
    #: The name the sentinels know the master by.
    master: str
    db: int = 0
    #: AUTH for the master: the URL's user information.
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    #: AUTH for the sentinels: the ``sentinel_username`` and ``sentinel_password`` parameters.
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    #: TLS to the sentinels and to the master (``rediss+sentinel://``).
    tls: bool = False


def sentinel_target(raw: str) -> SentinelTarget:
    """Parse a ``redis+sentinel://`` or ``rediss+sentinel://`` URL.

    ``[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/MASTER[/DB][?PARAMS]``: the user
    information is the master's AUTH, each sentinel's port defaults to 26379, and PARAMS may
    be ``sentinel_username``, ``sentinel_password`` (the sentinels' AUTH) and ``db``.  Raise
    ValueError saying what is wrong, never repeating a password.
    """
    scheme, _, rest = raw.partition("://")
    if scheme + "://" not in SENTINEL_SCHEMES:
        raise ValueError(f"must be {_SENTINEL_FORM}")
    if "#" in rest:
        raise ValueError("must not hold '#' (write it as %23)")
    rest, _, query = rest.partition("?")
    authority, _, path = rest.partition("/")
    if "@" in path:
        raise ValueError("holds '@' after the hosts: write '/' in a password as %2F")
    userinfo, at, hosts = authority.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        if not colon or not secret:
            raise ValueError("give the master's password as :PASSWORD@ or USER:PASSWORD@")
        username, password = urllib.parse.unquote(user) or None, urllib.parse.unquote(secret)
    if not hosts:
        raise ValueError(f"names no sentinel host: must be {_SENTINEL_FORM}")
    sentinels = tuple(_sentinel_address(h) for h in hosts.split(","))
    master, _, db_text = path.partition("/")
    master = urllib.parse.unquote(master)
    if not master:
        raise ValueError(f"names no master: must be {_SENTINEL_FORM}")
    if not master.isprintable() or " " in master:
        raise ValueError("the master's name must not hold spaces or control characters")
    params = _sentinel_params(query)
    if db_text and "db" in params:
        raise ValueError("gives the database twice: in the path and as ?db=")
    db_text = db_text or params.get("db", "")
    if db_text and not (db_text.isascii() and db_text.isdigit()):
        raise ValueError(f"the database must be a whole number, not {db_text!r}")
    return SentinelTarget(
        sentinels=sentinels,
        master=master,
        db=int(db_text or 0),
        username=username,
        password=password,
        sentinel_username=params.get("sentinel_username"),
        sentinel_password=params.get("sentinel_password"),
        tls=scheme == "rediss+sentinel",
    )


def _sentinel_address(raw: str) -> tuple[str, int]:
    """Parse one ``HOST[:PORT]`` of a sentinel URL's list (an IPv6 address in brackets).

    The errors do not repeat *raw*: a password holding ``/`` or ``?`` lands here.
    """
    if not raw:
        raise ValueError(f"names an empty sentinel host: must be {_SENTINEL_FORM}")
    if raw.startswith("["):
        host, bracket, tail = raw[1:].partition("]")
        if not bracket or not _IPV6.fullmatch(host):
            raise ValueError("a sentinel's IPv6 address is not [ADDRESS][:PORT]")
    else:
        host, _, _ = raw.partition(":")
        tail = raw[len(host) :]
        if not _HOST.fullmatch(host):
            raise ValueError("a sentinel is not HOST[:PORT] (an IPv6 address goes in brackets)")
    if not tail:
        return host, SENTINEL_PORT
    port_text = tail[1:]
    if tail[0] != ":" or not (port_text.isascii() and port_text.isdigit()):
        raise ValueError("a sentinel's port must be a number from 1 to 65535")
    if not 0 < int(port_text) < 65536:
        raise ValueError("a sentinel's port must be a number from 1 to 65535")
    return host, int(port_text)


_HOST = re.compile(r"[A-Za-z0-9._-]+")
_IPV6 = re.compile(r"[0-9A-Fa-f:.]+")


def _sentinel_params(query: str) -> dict[str, str]:
    """Parse a sentinel URL's query: each parameter once, ``+`` refused (space or plus?)."""
    params: dict[str, str] = {}
    for part in query.split("&") if query else ():
        name, eq, value = part.partition("=")
        if not eq or name not in _SENTINEL_QUERY:
            allowed = ", ".join(_SENTINEL_QUERY)
            raise ValueError(f"has a query parameter the gate does not read (it reads {allowed})")
        if name in params:
            raise ValueError(f"gives {name} twice")
        if "+" in value:
            raise ValueError(f"{name}: write + as %2B (some clients read + as a space)")
        params[name] = urllib.parse.unquote(value)
    return params


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
