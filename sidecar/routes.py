"""Route policy: which scope a method and path need, after the path is normalised."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f\\]")
#: What normal form folds away: an empty or dot segment, or a trailing slash.
_UNTIDY = re.compile(r"//|/\.\.?(?:/|$)|./$")
_METHOD = re.compile(r"[A-Z]+")
_PARAM = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
_SCOPE = re.compile(r"[A-Za-z0-9_.:-]+")

#: The scope value of a route that any valid key may call.
NO_SCOPE = ""


class BadPath(ValueError):
    """The request path is malformed or tries to escape its prefix."""


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
    """A set of routes, looked up by method and normalised path."""

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
        """Return the route for *method* (in any case) and the normalised *path*, or None."""
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
        if not template.startswith("/") or template != normalise(template):
            raise PolicyError(f"{source}:{lineno}: path {template!r} is not a normalised path")
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


@lru_cache(maxsize=8192)
def normalise(raw: str) -> str:
    """Return the path of the request target *raw* as a server would resolve it.

    The query and fragment are dropped, percent-escapes decoded once, repeated slashes and
    ``.`` segments folded and ``..`` segments resolved, so that no spelling of a path can
    match a route other than the one the upstream serves.  Raise `BadPath` for what no
    honest client sends: broken or double escapes, invalid UTF-8, control characters,
    backslashes, or ``..`` above the root.
    """
    path = raw.partition("?")[0].partition("#")[0]
    if not path.startswith("/"):
        raise BadPath("path must start with '/'")
    if "%" in path:
        if _BAD_ESCAPE.search(path):
            raise BadPath("broken percent-escape")
        try:
            path = _unquote(path)
        except UnicodeError:
            raise BadPath("path is not UTF-8") from None
        if _ESCAPE.search(path):
            raise BadPath("double percent-escape")
    if not path.isascii():
        try:
            path.encode()
        except UnicodeError:
            raise BadPath("path is not UTF-8") from None
    if _FORBIDDEN.search(path):
        raise BadPath("control character or backslash in path")
    if not _UNTIDY.search(path):
        return path  # already in normal form, as most are
    out: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not out:
                raise BadPath("path climbs above the root")
            out.pop()
        else:
            out.append(segment)
    return "/" + "/".join(out)


def _unquote(path: str) -> str:
    out = bytearray()
    parts = path.split("%")
    out += parts[0].encode()
    for part in parts[1:]:
        out.append(int(part[:2], 16))
        out += part[2:].encode()
    return out.decode("utf-8")
