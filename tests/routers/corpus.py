"""Request targets that hide one route inside another: the corpus of tests/e2e/test_routers.py.

Every route is spelled with each single-route trick (a trailing slash, an encoded letter, a
`;param`…), and every route A is spliced into every other route B with each climb: A's path,
then enough `..` segments to climb back out of it, then B's, with the slash, the dots and the
glue between them spelled one way or another (`%2F..%2F`, `;/../`, `%23/../`…).  A gate
that reads the target as its upstream does sends each to the route the upstream serves.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from sidecar.routes import Route


@dataclass(frozen=True)
class Probe:
    method: str
    target: str
    trick: str  # "plain" for a route's own path
    what: str  # the route, or "A > B" for a splice


#: How a climb from A to B is spelled: (glue after A, slash, dot-dot).
CLIMBS: dict[str, tuple[str, str, str]] = {
    "%2F..": ("", "%2F", ".."),
    "%2f..": ("", "%2f", ".."),
    "/..": ("", "/", ".."),
    "/%2E%2E": ("", "/", "%2E%2E"),
    "/%2e%2e": ("", "/", "%2e%2e"),
    "/.%2E": ("", "/", ".%2E"),
    "/%2e.": ("", "/", "%2e."),
    "%2F%2E%2E": ("", "%2F", "%2E%2E"),
    "/..;": ("", "/", "..;"),
    "%5C..": ("", "%5C", ".."),
    "%5c..": ("", "%5c", ".."),
    "\\..": ("", "\\", ".."),
    "%252F..": ("", "%252F", ".."),
    "%C0%AF..": ("", "%C0%AF", ".."),
    ";/..": (";", "/", ".."),
    ";x/..": (";x", "/", ".."),
    "%3B/..": ("%3B", "/", ".."),
    "%3F/..": ("%3F", "/", ".."),
    "%3f/..": ("%3f", "/", ".."),
    "%23/..": ("%23", "/", ".."),
    "#/..": ("#", "/", ".."),
    "?/..": ("?", "/", ".."),
}

#: Spellings of one route's own path; each takes the path's segments.
Spelling = Callable[[list[str]], str]


def _join(segments: list[str]) -> str:
    return "/" + "/".join(segments)


SPELLINGS: dict[str, Spelling] = {
    "trailing /": lambda s: _join(s) + "/",
    "trailing /.": lambda s: _join(s) + "/.",
    "trailing %2F": lambda s: _join(s) + "%2F",
    "trailing %2f": lambda s: _join(s) + "%2f",
    "trailing //": lambda s: _join(s) + "//",
    "leading //": lambda s: "/" + _join(s),
    "// inside": lambda s: _join(s[:-1]) + "/" + _join(s[-1:]),
    "/./ inside": lambda s: _join(s[:-1]) + "/." + _join(s[-1:]),
    "/%2E/ inside": lambda s: _join(s[:-1]) + "/%2E" + _join(s[-1:]),
    "%2F inside": lambda s: _join(s[:-1]) + "%2F" + s[-1],
    ";param last": lambda s: _join(s) + ";x=1",
    ";param first": lambda s: _join([s[0] + ";x", *s[1:]]),
    "%3Bparam last": lambda s: _join(s) + "%3Bx",
    "%2C last": lambda s: _join(s) + "%2C",
    "%00 last": lambda s: _join(s) + "%00",
    "?query": lambda s: _join(s) + "?x=/../me",
    "#fragment": lambda s: _join(s) + "#x",
    "%23fragment": lambda s: _join(s) + "%23x",
    "absolute-form": lambda s: "http://localhost" + _join(s),
    "absolute-form //": lambda s: "http://localhost/" + _join(s),
    "encoded letters": lambda s: _join(["".join(f"%{ord(c):02X}" for c in p) for p in s]),
    "upper case": lambda s: _join([s[0], *(p.upper() for p in s[1:])]),
    "title case": lambda s: _join([s[0], *(p.title() for p in s[1:])]),
}

#: Odd values for a route's last `{param}`.
ODD_IDS = ("..", ".", "%2E%2E", "a%2Fb", "a%5Cb", "a%252Fb")


def corpus(routes: list[Route], *, share: int = 1) -> list[Probe]:
    """Return the probes for *routes*, each (method, target) once.

    With *share* above 1, only one (route A, route B, climb) in *share* is spliced, chosen so
    that each climb still splices every route into some others and every route into it.
    """
    seen: dict[tuple[str, str], Probe] = {}
    for probe in _probes(routes, share):
        seen.setdefault((probe.method, probe.target), probe)
    return list(seen.values())


def fill(template: str) -> str:
    """Return *template* with each `{name}` filled with an id."""
    return re.sub(r"\{(\w+)\}", lambda m: m[1].lower() + "1", template)


def _probes(routes: list[Route], share: int) -> Iterator[Probe]:
    methods: dict[str, list[str]] = {}
    for r in routes:
        methods.setdefault(r.template, []).append(r.method)
    paths = {t: fill(t).strip("/").split("/") for t in methods}
    # The prefix every route shares (/api/v1): a climb from A stops there, then enters B.
    base = len(posixpath.commonpath([posixpath.dirname(t) for t in methods]).split("/")) - 1
    yield from ISSUE_EXAMPLES
    for template, segments in paths.items():
        for method in methods[template]:
            yield Probe(method, _join(segments), "plain", template)
            for name, spell in SPELLINGS.items():
                yield Probe(method, spell(segments), name, template)
            static = template.strip("/").split("/")
            for i, part in enumerate(segments):  # each static segment with an encoded letter
                if part == static[i]:
                    encoded = f"%{ord(part[0]):02{'x' if i % 2 else 'X'}}{part[1:]}"
                    yield Probe(
                        method,
                        _join([*segments[:i], encoded, *segments[i + 1 :]]),
                        "encoded letter",
                        template,
                    )
            if static[-1].startswith("{"):
                for odd in ODD_IDS:
                    yield Probe(method, _join([*segments[:-1], odd]), f"id {odd}", template)
    for i, (a, a_segments) in enumerate(paths.items()):
        for j, (b, b_segments) in enumerate(paths.items()):
            if a == b:
                continue
            for k, (name, (glue, slash, dots)) in enumerate(CLIMBS.items()):
                if (i + j + k) % share:  # 1/share of the product, each trick with every A and B
                    continue
                climbs = len(a_segments) - base
                body = slash.join(b_segments[base:])
                for suffix in ("", slash):
                    target = _join(a_segments) + glue + (slash + dots) * climbs
                    target += slash + body + suffix
                    for method in dict.fromkeys(methods[b] + methods[a]):
                        yield Probe(method, target, name + (" +/" if suffix else ""), f"{a} > {b}")


#: The issue's own examples, as reported.
ISSUE_EXAMPLES = [
    Probe("GET", "/api/v1/contacts/x%2F..%2F..%2Fme%2F", "issue", "contacts/{id} > me"),
    Probe("PATCH", "/api/v1/webhooks/w1%2F..%2F..%2Fcontacts%2Fc1", "issue", "webhooks > contacts"),
    Probe("POST", "/api/v1/contacts;/../messages", "issue", "contacts > messages"),
    Probe("POST", "/api/v1/contacts%3f/../messages", "issue", "contacts > messages"),
    Probe("POST", "/api/v1/messages#/../contacts", "issue", "messages > contacts"),
    Probe("GET", "/api/v1/me/", "issue", "me"),
    Probe("GET", "/api/v1/me/.", "issue", "me"),
]
