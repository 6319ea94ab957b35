"""What a registry asks for: ``WWW-Authenticate`` challenges and the token scopes of
docker's token protocol (``repository:name:pull,push``)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: a lower-case scheme and its parameters."""

    scheme: str
    params: Mapping[str, str]


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def parse_challenges(values: str | Iterable[str]) -> list[Challenge]:
    """Parse ``WWW-Authenticate`` values (RFC 9110 §11.6.1), tolerating common sloppiness.

    Handles several challenges per header, quoted strings with commas and escapes,
    and token68 credentials (which are skipped).
    """
    out: list[Challenge] = []
    for value in [values] if isinstance(values, str) else values:
        out.extend(_parse_one_header(value))
    return out


def _parse_one_header(s: str) -> list[Challenge]:
    out: list[Challenge] = []
    i, n = 0, len(s)

    def skip(chars: str) -> None:
        nonlocal i
        while i < n and s[i] in chars:
            i += 1

    while i < n:
        skip(" \t,")
        m = _TOKEN.match(s, i)
        if not m:
            i += 1  # junk: step over it
            continue
        scheme, i = m.group().lower(), m.end()
        params: dict[str, str] = {}
        skip(" \t")
        # token68 directly after the scheme (e.g. "Negotiate abc=="): not a parameter list.
        t68 = _TOKEN68.match(s, i)
        if t68 and t68.group().endswith("=") and _at_boundary(s, t68.end()):
            i = t68.end()
        while i < n:
            skip(" \t,")
            start = i
            m = _TOKEN.match(s, i)
            if not m:
                break
            name, j = m.group().lower(), m.end()
            while j < n and s[j] in " \t":
                j += 1
            if j >= n or s[j] != "=":
                i = start  # a bare token starts the next challenge
                break
            j += 1
            while j < n and s[j] in " \t":
                j += 1
            if j < n and s[j] == '"':
                value, j = _quoted(s, j)
            else:
                v = re.compile(r"[^,\s]*").match(s, j)
                assert v is not None
                value, j = v.group(), v.end()
            params.setdefault(name, value)
            i = j
        out.append(Challenge(scheme, params))
    return out


def _at_boundary(s: str, i: int) -> bool:
    while i < len(s) and s[i] in " \t":
        i += 1
    return i >= len(s) or s[i] == ","


def _quoted(s: str, i: int) -> tuple[str, int]:
    """The quoted-string starting at s[i] == '"', unescaped; and the index after it."""
    buf: list[str] = []
    i += 1
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            buf.append(s[i + 1])
            i += 2
            continue
        if c == '"':
            return "".join(buf), i + 1
        buf.append(c)
        i += 1
    return "".join(buf), i  # unterminated: take the rest


# A scope is a set of (type, name, action) triples; they merge and compare as sets.
Scope = frozenset[tuple[str, str, str]]

_API_PATH = re.compile(r"^/v2/(?P<repo>.+?)/(?:manifests|blobs|tags|referrers)/")
_PULL = ("pull",)
_PUSH = ("pull", "push")
# distribution checks DELETE against its own "delete" action, not push.
_ACTIONS = {"GET": _PULL, "HEAD": _PULL, "POST": _PUSH, "PUT": _PUSH, "PATCH": _PUSH, "DELETE": ("delete",)}


def scope_for_request(method: str, url: httpx.URL) -> Scope:
    """The token scope a registry API request needs; empty for the ``/v2/`` ping."""
    path = url.path
    if path.rstrip("/") == "/v2/_catalog":
        return frozenset({("registry", "catalog", "*")})
    m = _API_PATH.match(path)
    if not m:
        return frozenset()
    repo = m.group("repo")
    triples = {("repository", repo, a) for a in _ACTIONS.get(method.upper(), _PULL)}
    mount_from = url.params.get("from")
    if mount_from and method.upper() == "POST":
        triples.add(("repository", mount_from, "pull"))
    return frozenset(triples)


def parse_scope(text: str) -> Scope:
    """Parse space-separated ``type:name:action[,action]`` scopes (names may hold colons)."""
    triples: set[tuple[str, str, str]] = set()
    for item in text.split():
        kind, sep, rest = item.partition(":")
        name, sep2, actions = rest.rpartition(":")
        if not (sep and sep2 and kind and name):
            continue
        triples.update((kind, name, a) for a in actions.split(",") if a)
    return frozenset(triples)


def format_scope(scope: Scope) -> list[str]:
    """``type:name:a,b`` strings, one per resource, in a stable order."""
    grouped: dict[tuple[str, str], set[str]] = {}
    for kind, name, action in scope:
        grouped.setdefault((kind, name), set()).add(action)
    return [f"{k}:{n}:{','.join(sorted(a))}" for (k, n), a in sorted(grouped.items())]


def describe_scope(scope: Scope) -> str:
    return " ".join(format_scope(scope)) or "(no scope)"
