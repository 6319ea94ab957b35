"""Registry authentication: the 401 dance.

A ``RegistryAuth`` is an ``httpx.Auth`` for one registry. It answers ``Basic`` and
``Bearer`` challenges (docker's token protocol, including the OAuth2 refresh-token
grant), caches tokens per scope, and only ever puts an Authorization header on
requests to the registry it was made for. Secrets never appear in reprs, logs or
exception messages.
"""

from __future__ import annotations

import base64
import logging
import ssl
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

import httpx

from config.reference import canonical_registry
from workers.engine.challenges import (
    Scope,
    describe_scope,
    format_scope,
    parse_challenges,
    parse_scope,
    scope_for_request,
)
from workers.engine.errors import (
    Denied,
    InvalidRequest,
    RegistryError,
    ServerError,
    Unauthorized,
    transport_error,
)
from workers.engine.keychain import Credential, Keychain, generation_of
from workers.engine.tls import client_context

log = logging.getLogger(__name__)

_CLIENT_ID = "ferry"
# Token lifetime when the token service does not say (docker's default).
DEFAULT_TOKEN_TTL = 60.0
# Refresh this long before expiry; capped so short-lived tokens stay usable.
_MAX_EXPIRY_MARGIN = 30.0
_CACHE_PRUNE_AT = 256


@dataclass
class _Token:
    header: str
    scope: Scope
    expires_at: float  # time.monotonic()


@dataclass(frozen=True)
class _Realm:
    realm: str
    service: str


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
        tls: Callable[[str], ssl.SSLContext] = lambda host: client_context(),
    ) -> None:
        self.registry = canonical_registry(registry)
        self._keychain = keychain
        self._token_client = token_client
        # The TLS context for a token realm's host (``host[:port]``): its own settings, or the default.
        self._tls = tls
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
                f"({describe_scope(scope)}); start uploads with a POST",
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
        what = describe_scope(scope)
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
        verify = self._tls(realm_url.netloc.decode("ascii"))
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
        what = f"token for {self.registry} ({describe_scope(scope)}) from {url.host}"
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
