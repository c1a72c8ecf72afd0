"""Route policy: which scope a method and path need, the path read exactly as it is sent."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

_METHOD = re.compile(r"[A-Z]+")
_PARAM = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
#: A template's literal segment: characters no client escapes (RFC 3986's unreserved).
_LITERAL = re.compile(r"[A-Za-z0-9._~-]+")
_SCOPE = re.compile(r"[A-Za-z0-9_.:-]+")

#: The scope value of a route that any valid key may call.
NO_SCOPE = ""


class BadPath(ValueError):
    """The request path is malformed, or two servers could route it two ways."""


class PolicyError(ValueError):
    """The route policy file is malformed."""


@dataclass(frozen=True, slots=True)
class Route:
    """A method and path template and the scope it needs (`NO_SCOPE` for none)."""

    method: str
    template: str
    scope: str


@dataclass(slots=True)
class Policy:
    """A set of routes, looked up by method and path (see `checked_path`)."""

    routes: tuple[Route, ...]
    _static: dict[tuple[str, str], Route] = field(init=False, repr=False)
    _templated: dict[tuple[str, int], list[tuple[tuple[str | None, ...], Route]]] = field(
        init=False, repr=False
    )

    def __post_init__(self) -> None:
        self._static = {}
        self._templated = {}
        for route in self.routes:
            parts = tuple(
                None if _PARAM.fullmatch(p) else p for p in route.template.strip("/").split("/")
            )
            if None in parts:
                key = (route.method, len(parts))
                self._templated.setdefault(key, []).append((parts, route))
            else:
                self._static[(route.method, route.template)] = route

    @property
    def scopes(self) -> frozenset[str]:
        """Return every scope some route needs: the scopes a key may usefully carry."""
        return frozenset(r.scope for r in self.routes if r.scope != NO_SCOPE)

    def match(self, method: str, path: str) -> Route | None:
        """Return the route for *method* (in any case) and the checked *path*, or None."""
        method = method.upper()
        if method == "HEAD":
            method = "GET"
        route = self._static.get((method, path))
        if route is not None:
            return route
        segments = path.strip("/").split("/")
        for parts, candidate in self._templated.get((method, len(segments)), ()):
            if all(p is None or p == s for p, s in zip(parts, segments, strict=True)):
                return candidate
        return None


def parse_policy(text: str, *, source: str = "<routes>") -> Policy:
    """Parse the route file *text* (see ``wacrm.routes``); *source* names it in errors."""
    routes: list[Route] = []
    seen: set[tuple[str, str]] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 3:
            raise PolicyError(f"{source}:{lineno}: expected 'METHODS PATH SCOPE', got {line!r}")
        methods, template, scope = fields
        if not _is_template(template):
            raise PolicyError(
                f"{source}:{lineno}: path {template!r} is not '/' and segments of"
                " A-Z a-z 0-9 . _ ~ - or {name}"
            )
        if scope != "-" and not _SCOPE.fullmatch(scope):
            raise PolicyError(
                f"{source}:{lineno}: scope {scope!r} has characters other than A-Z a-z 0-9 _ . : -"
            )
        for method in methods.split(","):
            if not _METHOD.fullmatch(method):
                raise PolicyError(f"{source}:{lineno}: {method!r} is not an HTTP method")
            if (method, template) in seen:
                raise PolicyError(f"{source}:{lineno}: {method} {template} is listed twice")
            seen.add((method, template))
            routes.append(Route(method, template, NO_SCOPE if scope == "-" else scope))
    if not routes:
        raise PolicyError(f"{source}: no routes")
    return Policy(tuple(routes))


def _is_template(template: str) -> bool:
    if template == "/":
        return True
    segments = template.split("/")
    return segments[0] == "" and all(
        (_LITERAL.fullmatch(s) and s not in (".", "..")) or _PARAM.fullmatch(s)
        for s in segments[1:]
    )


def load_policy(path: Path | None = None) -> Policy:
    """Load the route file at *path*, or Wacrm's own table when *path* is None."""
    if path is None:
        text = resources.files("sidecar").joinpath("wacrm.routes").read_text()
        return parse_policy(text, source="wacrm.routes")
    try:
        text = path.read_text()
    except OSError as e:
        raise PolicyError(f"cannot read route file {path}: {e.strerror}") from None
    return parse_policy(text, source=str(path))


def checked_path(target: str, *, encoded_slashes: bool = False) -> str:
    """Return the path of the request target *target*, exactly as the upstream receives it.

    The gate matches routes on the path as sent, not on a decoded or resolved form, and
    refuses (`BadPath`) every path that two servers could route two ways: empty and dot
    segments, a trailing slash, ``;`` parameters, backslashes, escapes of ``/ \\ ? # ; %``, of
    control characters and of characters that need none, invalid UTF-8, a ``#`` anywhere, and
    raw characters a URI may not hold.  What is left has one reading: a route template's
    literal segments hold only characters that are never escaped, so an escape can only ever
    fall inside a ``{name}`` segment, for every router alike.  With *encoded_slashes*, ``%2F``
    is data inside its segment.  The query is not examined.
    """
    if "#" in target:
        raise BadPath("'#' in the request target")
    path = target.partition("?")[0]
    if _CLEAN.fullmatch(path):
        return path  # the common case: nothing escaped, nothing to refuse
    if not path.startswith("/"):
        raise BadPath("the path must start with '/'")
    if path == "/":
        return path
    if bad := _RAW_UNSAFE.search(path):
        raise BadPath(_why_raw(bad.group()))
    for segment in path[1:].split("/"):
        if segment in ("", ".", ".."):
            raise BadPath("empty or dot segment, or a trailing '/'")
        if "%" in segment:
            _check_escapes(segment, encoded_slashes)
    return path


#: A path whose segments are all non-empty, not dot segments, and free of escapes and ``;``.
_CLEAN = re.compile(r"(?:/(?!\.\.?(?:/|$))[A-Za-z0-9\-._~!$&'()*+,=:@]+)+|/")
#: Raw characters a path must not hold: outside RFC 3986's pchar, or ``;``.
_RAW_UNSAFE = re.compile(r"[^A-Za-z0-9\-._~!$&'()*+,=:@/%]")
_HEX = frozenset("0123456789abcdefABCDEF")
#: Escaped characters that a URI never needs to escape: they have one spelling, unescaped.
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
#: Escaped characters that some server reads again as a delimiter.
_DELIMITERS = {ord("/"): "'/'", ord("\\"): "'\\'", ord("?"): "'?'", ord("#"): "'#'"}
_DELIMITERS |= {ord(";"): "';'", ord("%"): "'%'"}


def _why_raw(char: str) -> str:
    if char == ";":
        return "';' in the path"
    if char == "\\":
        return "'\\' in the path"
    if char.isprintable() and char.isascii():
        return f"{char!r} must be percent-encoded"
    return "control or non-ASCII character in the path"


def _check_escapes(segment: str, encoded_slashes: bool) -> None:
    first, *rest = segment.split("%")
    decoded = bytearray(first.encode())
    for part in rest:
        digits = part[:2]
        if len(digits) < 2 or not _HEX.issuperset(digits):
            raise BadPath("broken percent-escape")
        byte = int(digits, 16)
        if byte in _UNRESERVED:
            raise BadPath(f"escaped {chr(byte)!r}, which needs no escape")
        if byte in _DELIMITERS and not (byte == 0x2F and encoded_slashes):
            raise BadPath(f"escaped {_DELIMITERS[byte]}")
        if byte < 0x20 or byte == 0x7F:
            raise BadPath("escaped control character")
        decoded.append(byte)
        decoded += part[2:].encode()
    try:
        decoded.decode()
    except UnicodeDecodeError:
        raise BadPath("escapes are not UTF-8") from None
