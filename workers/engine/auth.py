"""Registry authentication: credentials, where they come from, and the 401 dance.

A ``RegistryAuth`` is an ``httpx.Auth`` for one registry. It answers ``Basic`` and
``Bearer`` challenges (docker's token protocol, including the OAuth2 refresh-token
grant), caches tokens per scope, and only ever puts an Authorization header on
requests to the registry it was made for. Secrets never appear in reprs, logs or
exception messages.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
import re
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import httpx

from config.reference import DOCKER_HUB, HUB_ALIASES
from workers.engine.errors import (
    Denied,
    InvalidRequest,
    RegistryError,
    ServerError,
    Unauthorized,
    transport_error,
)
from workers.engine.tls import client_context

log = logging.getLogger(__name__)

# Where docker keeps Docker Hub credentials (config.json keys, credential helpers).
DOCKER_HUB_SERVER_URL = "https://index.docker.io/v1/"
# Credentials are also filed under the Hub's web host.
_HUB_ALIASES = HUB_ALIASES | {"registry.hub.docker.com"}
_CLIENT_ID = "ferry"
# Token lifetime when the token service does not say (docker's default).
DEFAULT_TOKEN_TTL = 60.0
# Refresh this long before expiry; capped so short-lived tokens stay usable.
_MAX_EXPIRY_MARGIN = 30.0
_HELPER_TIMEOUT = 60.0
_CACHE_PRUNE_AT = 256


# --------------------------------------------------------------------------- credentials


@dataclass(frozen=True, repr=False)
class Credential:
    """What to present to a registry: a username/password, an identity token, or a bearer token.

    ``identity_token`` is an OAuth2 refresh token (docker's ``identitytoken``);
    ``registry_token`` is a bearer token sent to the registry as is.
    """

    username: str | None = None
    password: str | None = None
    identity_token: str | None = None
    registry_token: str | None = None

    @property
    def has_basic(self) -> bool:
        return bool(self.username) and self.password is not None

    def __repr__(self) -> str:
        secrets = [
            n for n in ("password", "identity_token", "registry_token") if getattr(self, n) is not None
        ]
        return f"Credential(username={self.username!r}, secrets={secrets})"

    __str__ = __repr__


def canonical_registry(name: str) -> str:
    """``host[:port]`` in lower case, with Docker Hub's many names folded into ``docker.io``.

    Accepts URLs as found in docker's config (``https://index.docker.io/v1/``).
    """
    s = name.strip()
    if "://" in s:
        s = urlsplit(s).netloc or s
    s = s.split("/", 1)[0].lower()
    return DOCKER_HUB if s in _HUB_ALIASES else s


class Keychain(Protocol):
    """Finds the credential for a registry (``docker.io`` or ``host[:port]``), or None."""

    def resolve(self, registry: str) -> Credential | None: ...


class AnonymousKeychain:
    """No credentials anywhere."""

    def resolve(self, registry: str) -> Credential | None:
        return None


class StaticKeychain:
    """A fixed mapping, e.g. built from ferry's settings at an entry point."""

    def __init__(self, mapping: Mapping[str, Credential]) -> None:
        self._creds = {canonical_registry(k): v for k, v in mapping.items()}

    def resolve(self, registry: str) -> Credential | None:
        return self._creds.get(canonical_registry(registry))

    def __repr__(self) -> str:
        return f"StaticKeychain(registries={sorted(self._creds)})"


class RotatingKeychain:
    """Several credentials for a registry, one in use at a time: ``choose(registry)`` says which
    (the cluster moves on when one's pull quota is spent). ``generation`` lets RegistryAuth
    notice a switch and drop the tokens of the old credential."""

    def __init__(self, credentials: Mapping[str, Sequence[Credential]], choose: Callable[[str], int]) -> None:
        self._creds = {canonical_registry(k): list(v) for k, v in credentials.items() if v}
        self._choose = choose

    def generation(self, registry: str) -> int:
        reg = canonical_registry(registry)
        return self._choose(reg) % len(self._creds[reg]) if reg in self._creds else 0

    def resolve(self, registry: str) -> Credential | None:
        reg = canonical_registry(registry)
        creds = self._creds.get(reg)
        return creds[self.generation(reg)] if creds else None

    def __repr__(self) -> str:
        return f"RotatingKeychain(registries={sorted(self._creds)})"


class ChainKeychain:
    """Asks each keychain in turn; the first credential found wins."""

    def __init__(self, *keychains: Keychain) -> None:
        self._keychains = keychains

    def resolve(self, registry: str) -> Credential | None:
        for kc in self._keychains:
            cred = kc.resolve(registry)
            if cred is not None:
                return cred
        return None

    def generation(self, registry: str) -> int:
        return sum(generation_of(kc, registry) for kc in self._keychains)


def generation_of(keychain: Keychain, registry: str) -> int:
    """Changes when ``keychain`` starts answering with another credential (rotation)."""
    gen = getattr(keychain, "generation", None)
    return int(gen(registry)) if callable(gen) else 0


def default_docker_config() -> Path:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json`` (docker's own rule)."""
    base = os.environ.get("DOCKER_CONFIG")
    return (Path(base) if base else Path.home() / ".docker") / "config.json"


class DockerConfigKeychain:
    """Credentials from docker's ``config.json``, as ``docker login`` leaves them.

    Order: a ``credHelpers`` entry for the registry, then an ``auths`` entry that
    holds credentials, then the ``credsStore`` default helper.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else default_docker_config()
        self._lock = threading.Lock()
        self._doc: dict[str, object] | None = None
        # Helper answers are cached: running a helper per request would be slow.
        self._helper_cache: dict[str, Credential | None] = {}

    def __repr__(self) -> str:
        return f"DockerConfigKeychain(path={str(self.path)!r})"

    def resolve(self, registry: str) -> Credential | None:
        registry = canonical_registry(registry)
        doc = self._load()
        helpers = doc.get("credHelpers")
        if isinstance(helpers, dict):
            for key, helper in helpers.items():
                if isinstance(helper, str) and helper and canonical_registry(key) == registry:
                    return self._from_helper(helper, registry)
        auths = doc.get("auths")
        if isinstance(auths, dict):
            for key, entry in auths.items():
                if canonical_registry(key) == registry and isinstance(entry, dict):
                    cred = _from_auth_entry(entry, registry, self.path)
                    if cred is not None:
                        return cred
        store = doc.get("credsStore")
        if isinstance(store, str) and store:
            return self._from_helper(store, registry)
        return None

    def _load(self) -> dict[str, object]:
        with self._lock:
            if self._doc is None:
                try:
                    raw = self.path.read_text(encoding="utf-8")
                except FileNotFoundError:
                    raw = "{}"
                except OSError as e:
                    raise Unauthorized(f"cannot read docker config {self.path}: {e.strerror}") from None
                try:
                    doc = json.loads(raw) if raw.strip() else {}
                except ValueError as e:
                    # The decoder's message names a position, never the content.
                    raise Unauthorized(f"docker config {self.path} is not valid JSON: {e}") from None
                if not isinstance(doc, dict):
                    raise Unauthorized(f"docker config {self.path} is not a JSON object")
                self._doc = doc
            return self._doc

    def _from_helper(self, helper: str, registry: str) -> Credential | None:
        key = f"{helper}\0{registry}"
        with self._lock:
            if key in self._helper_cache:
                return self._helper_cache[key]
        cred = run_credential_helper(helper, registry)
        with self._lock:
            self._helper_cache[key] = cred
        return cred


def _from_auth_entry(entry: Mapping[str, object], registry: str, path: Path) -> Credential | None:
    def text(name: str) -> str | None:
        v = entry.get(name)
        return v if isinstance(v, str) and v else None

    username, password = text("username"), text("password")
    encoded = text("auth")
    if encoded:
        try:
            decoded = base64.b64decode(encoded, validate=False).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise Unauthorized(f"docker config {path}: the auth entry for {registry} is not base64") from None
        user, sep, pw = decoded.partition(":")
        if not sep:
            raise Unauthorized(f"docker config {path}: the auth entry for {registry} is not user:password")
        username, password = user, pw
    identity, registry_token = text("identitytoken"), text("registrytoken")
    if identity:
        return Credential(username=username, identity_token=identity)
    if registry_token:
        return Credential(registry_token=registry_token)
    if username and password is not None:
        return Credential(username=username, password=password)
    return None


def run_credential_helper(helper: str, registry: str) -> Credential | None:
    """Ask ``docker-credential-<helper> get`` for a registry's credential.

    The helper reads the server URL on stdin and prints ``{"Username", "Secret"}``;
    a Username of ``<token>`` means the Secret is an identity token.
    """
    server = DOCKER_HUB_SERVER_URL if canonical_registry(registry) == DOCKER_HUB else registry
    program = f"docker-credential-{helper}"
    try:
        proc = subprocess.run(
            [program, "get"],
            input=server.encode(),
            capture_output=True,
            timeout=_HELPER_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise Unauthorized(f"credential helper {program} for {registry} is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise Unauthorized(
            f"credential helper {program} for {registry} timed out", temporary=True
        ) from None
    if proc.returncode != 0:
        said = (proc.stdout + proc.stderr).decode("utf-8", "replace")
        if "credentials not found" in said.lower():
            return None
        # Helpers print short error messages, not secrets; keep the first line only.
        first = said.strip().splitlines()[0][:200] if said.strip() else f"exit status {proc.returncode}"
        raise Unauthorized(f"credential helper {program} failed for {registry}: {first}")
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        raise Unauthorized(f"credential helper {program} gave unreadable output for {registry}") from None
    if not isinstance(doc, dict):
        raise Unauthorized(f"credential helper {program} gave unreadable output for {registry}")
    username, secret = doc.get("Username"), doc.get("Secret")
    if not isinstance(secret, str) or not secret:
        return None
    if username == "<token>":
        return Credential(identity_token=secret)
    return Credential(username=username if isinstance(username, str) else None, password=secret)


# --------------------------------------------------------------------------- challenges


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


# --------------------------------------------------------------------------- scopes

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


def _describe(scope: Scope) -> str:
    return " ".join(format_scope(scope)) or "(no scope)"


# --------------------------------------------------------------------------- the auth flow


@dataclass
class _Token:
    header: str
    scope: Scope
    expires_at: float  # time.monotonic()


@dataclass(frozen=True)
class _Realm:
    realm: str
    service: str


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _basic_header(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


class RegistryAuth(httpx.Auth):
    """Authenticates requests to one registry; safe to share between threads.

    Request bodies are never replayed (``requires_request_body = False``): a
    streamed PATCH/PUT that meets a 401 fails instead of being re-sent. Callers
    must therefore start each upload with a POST, which earns the push token
    that the following PATCH/PUT requests reuse from the cache.
    """

    requires_request_body = False
    requires_response_body = False

    def __init__(
        self,
        registry: str,
        keychain: Keychain,
        *,
        token_client: httpx.Client | None = None,
        insecure: bool = False,
    ) -> None:
        self.registry = canonical_registry(registry)
        self._keychain = keychain
        self._token_client = token_client
        self._insecure = insecure
        self._lock = threading.Lock()
        self._resolve_lock = threading.Lock()
        self._credential: Credential | None = None
        self._resolved = False
        self._generation = 0
        self._basic = False  # the registry asked for Basic: send it upfront from now on
        self._realm: _Realm | None = None  # the last Bearer challenge, for upfront tokens
        self._tokens: dict[tuple[_Realm, Scope], _Token] = {}
        self._fetch_locks: dict[tuple[_Realm, Scope], threading.Lock] = {}

    def __repr__(self) -> str:
        return f"RegistryAuth(registry={self.registry!r})"

    # httpx entry points ------------------------------------------------------

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if canonical_registry(request.url.netloc.decode("ascii")) != self.registry:
            # Not our registry (e.g. an absolute upload URL elsewhere): no credentials go there.
            yield request
            return
        self._follow_rotation()
        scope = scope_for_request(request.method, request.url)
        sent = self._upfront_header(scope)
        if sent is not None:
            request.headers["Authorization"] = sent
        response = yield request
        if response.status_code != 401 or not self._from_registry(response):
            return
        header = self._answer(response, scope, sent)
        if not isinstance(request.stream, httpx.ByteStream):
            # A streamed body is spent; the caller restarts the upload, now with a cached token.
            raise Unauthorized(
                f"registry {self.registry} asked for authentication during a streamed upload "
                f"({_describe(scope)}); start uploads with a POST",
                status=401,
                temporary=True,
            )
        request.headers["Authorization"] = header
        response = yield request
        if response.status_code == 401 and self._from_registry(response):
            raise self._refused(response, scope)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        # Only reached through httpx.AsyncClient: token fetches here are blocking.
        raise RuntimeError("RegistryAuth fetches tokens synchronously; use it with httpx.Client")

    # internals ---------------------------------------------------------------

    def _from_registry(self, response: httpx.Response) -> bool:
        # After a redirect the 401 may come from blob storage elsewhere: not ours to answer.
        return canonical_registry(response.request.url.netloc.decode("ascii")) == self.registry

    def _follow_rotation(self) -> None:
        """When the keychain moved to another credential, forget the old one and its tokens."""
        gen = generation_of(self._keychain, self.registry)
        if gen == self._generation:
            return
        with self._resolve_lock, self._lock:
            self._generation = gen
            self._resolved = False
            self._tokens.clear()

    def _credential_for(self) -> Credential | None:
        # Resolved once, lazily: open registries never run a credential helper.
        with self._resolve_lock:
            if not self._resolved:
                self._credential = self._keychain.resolve(self.registry)
                self._resolved = True
            return self._credential

    def _upfront_header(self, scope: Scope) -> str | None:
        with self._lock:
            realm, basic = self._realm, self._basic
        if realm is not None:
            return self._bearer(realm, scope, scope, stale=None)
        if basic:
            cred = self._credential_for()
            if cred is not None and cred.has_basic:
                assert cred.username is not None and cred.password is not None
                return _basic_header(cred.username, cred.password)
        return None

    def _answer(self, response: httpx.Response, scope: Scope, sent: str | None) -> str:
        challenges = parse_challenges(response.headers.get_list("www-authenticate"))
        bearer = next((c for c in challenges if c.scheme == "bearer" and c.params.get("realm")), None)
        if bearer is not None:
            realm = _Realm(bearer.params["realm"], bearer.params.get("service", ""))
            with self._lock:
                self._realm = realm
            wanted = scope | parse_scope(bearer.params.get("scope", ""))
            return self._bearer(realm, scope, wanted, stale=sent)
        if any(c.scheme == "basic" for c in challenges):
            cred = self._credential_for()
            if cred is None or not cred.has_basic:
                raise Unauthorized(f"registry {self.registry} requires credentials", status=401)
            assert cred.username is not None and cred.password is not None
            with self._lock:
                self._basic = True
            return _basic_header(cred.username, cred.password)
        schemes = ", ".join(sorted({c.scheme for c in challenges})) or "none"
        raise Unauthorized(
            f"registry {self.registry} answered 401 with no usable challenge (schemes: {schemes})",
            status=401,
        )

    def _refused(self, response: httpx.Response, scope: Scope) -> RegistryError:
        cred = self._credential_for()
        what = _describe(scope)
        if cred is None:
            return Unauthorized(f"registry {self.registry} requires credentials for {what}", status=401)
        challenges = parse_challenges(response.headers.get_list("www-authenticate"))
        if any(c.params.get("error") == "insufficient_scope" for c in challenges):
            return Denied(
                f"registry {self.registry} denied {what} to {_who(cred)}", status=401, codes=["DENIED"]
            )
        return Unauthorized(
            f"registry {self.registry} rejected the credentials of {_who(cred)} for {what}", status=401
        )

    def _bearer(self, realm: _Realm, key_scope: Scope, wanted: Scope, stale: str | None) -> str:
        """A valid Authorization header for ``key_scope``, fetching at most once at a time."""
        key = (realm, key_scope)
        with self._lock:
            tok = self._lookup(realm, key_scope, stale)
            if tok is not None:
                return tok.header
            fetch_lock = self._fetch_locks.setdefault(key, threading.Lock())
        with fetch_lock:
            with self._lock:
                # Another thread may have fetched it while this one waited.
                tok = self._lookup(realm, key_scope, stale)
                if tok is not None:
                    return tok.header
            header, ttl = self._fetch_token(realm, wanted)
            now = time.monotonic()
            tok = _Token(header, wanted | key_scope, now + ttl - min(_MAX_EXPIRY_MARGIN, ttl * 0.1))
            with self._lock:
                self._tokens[key] = tok
                if len(self._tokens) > _CACHE_PRUNE_AT:
                    self._prune(now)
            return tok.header

    def _lookup(self, realm: _Realm, scope: Scope, stale: str | None) -> _Token | None:
        """A live cached token covering ``scope`` (and not the one just refused). Holds _lock."""
        now = time.monotonic()

        def usable(tok: _Token) -> bool:
            return tok.expires_at > now and tok.header != stale and scope <= tok.scope

        # The exact scope first: a hit there (nearly every request) skips scanning the rest.
        exact = self._tokens.get((realm, scope))
        if exact is not None and usable(exact):
            return exact
        return next((t for (r, s), t in self._tokens.items() if r == realm and s != scope and usable(t)), None)

    def _prune(self, now: float) -> None:
        for key in [k for k, t in self._tokens.items() if t.expires_at <= now]:
            del self._tokens[key]
            lock = self._fetch_locks.get(key)
            if lock is not None and not lock.locked():
                del self._fetch_locks[key]

    def _new_client(self, realm_url: httpx.URL) -> httpx.Client:
        # Token fetches are rare (one per scope per token lifetime): a short-lived client
        # keeps this object free of resources to close.
        verify: ssl.SSLContext | bool = client_context()
        if self._insecure or _is_loopback(realm_url.host):
            verify = False
        return httpx.Client(timeout=httpx.Timeout(30.0), verify=verify, follow_redirects=True)

    def _fetch_token(self, realm: _Realm, scope: Scope) -> tuple[str, float]:
        cred = self._credential_for()
        if cred is not None and cred.registry_token:
            return f"Bearer {cred.registry_token}", DEFAULT_TOKEN_TTL
        try:
            url = httpx.URL(realm.realm)
        except httpx.InvalidURL:
            raise Unauthorized(f"registry {self.registry} named an invalid token realm") from None
        if url.scheme not in ("http", "https"):
            raise Unauthorized(f"registry {self.registry} named a token realm that is not http(s)")
        scopes = format_scope(scope)
        what = f"token for {self.registry} ({_describe(scope)}) from {url.host}"
        own = self._token_client is None
        client = self._new_client(url) if self._token_client is None else self._token_client
        try:
            if cred is not None and cred.identity_token:
                response = self._oauth_post(client, url, realm, scopes, cred.identity_token)
                if response.status_code in (404, 405):
                    log.debug("token service at %s has no OAuth2 endpoint; using GET", url.host)
                    # As containerd does: the identity token as the basic password.
                    basic: tuple[str, str] | None = (cred.username or "", cred.identity_token)
                    response = self._get(client, url, realm, scopes, basic)
            else:
                basic = (cred.username or "", cred.password or "") if cred and cred.has_basic else None
                response = self._get(client, url, realm, scopes, basic)
        except httpx.TransportError as e:
            raise transport_error(e, url=str(url.copy_with(query=None))) from None
        finally:
            if own:
                client.close()
        log.debug("%s: HTTP %s", what, response.status_code)
        return self._read_token(response, what, cred)

    def _get(
        self,
        client: httpx.Client,
        url: httpx.URL,
        realm: _Realm,
        scopes: list[str],
        basic: tuple[str, str] | None,
    ) -> httpx.Response:
        params: list[tuple[str, str]] = []
        if realm.service:
            params.append(("service", realm.service))
        params += [("scope", s) for s in scopes]
        headers = {}
        if basic is not None:
            if basic[0]:
                params.append(("account", basic[0]))
            headers["Authorization"] = _basic_header(*basic)
        return client.get(url.copy_merge_params(tuple(params)), headers=headers)

    def _oauth_post(
        self, client: httpx.Client, url: httpx.URL, realm: _Realm, scopes: list[str], refresh: str
    ) -> httpx.Response:
        form = {
            "grant_type": "refresh_token",
            "refresh_token": refresh,
            "service": realm.service,
            "client_id": _CLIENT_ID,
            "scope": " ".join(scopes),
        }
        return client.post(url, data=form)

    def _read_token(self, response: httpx.Response, what: str, cred: Credential | None) -> tuple[str, float]:
        status = response.status_code
        if status in (401, 403):
            if cred is None:
                raise Unauthorized(f"registry {self.registry} requires credentials ({what})", status=status)
            raise Unauthorized(
                f"token service refused the credentials of {_who(cred)}: {what}", status=status
            )
        if status == 429 or status >= 500:
            raise ServerError(f"token service failed with HTTP {status}: {what}", status=status,
                              temporary=True)
        if status != 200:
            raise InvalidRequest(f"token service answered HTTP {status}: {what}", status=status)
        try:
            doc = response.json()
        except ValueError:
            raise InvalidRequest(f"token service sent no JSON: {what}") from None
        token = (doc.get("token") or doc.get("access_token")) if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise InvalidRequest(f"token service sent no token: {what}")
        ttl = doc.get("expires_in")
        lifetime = float(ttl) if isinstance(ttl, (int, float)) and ttl > 0 else DEFAULT_TOKEN_TTL
        return f"Bearer {token}", lifetime


def _who(cred: Credential) -> str:
    if cred.username:
        return f"user {cred.username!r}"
    return "the identity token" if cred.identity_token else "the registry token"
