"""HTTP to registries: one pooled client per registry host, errors mapped to types.

Clients are created on first use and kept for the life of the process, so warm
syncs reuse their keep-alive connections instead of paying a handshake per image.
The scheme and TLS context of each host come from ``TlsPolicy`` (workers/engine/tls.py).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import version

import httpx

from config import defaults
from config.reference import DOCKER_HUB_API
from workers.engine.auth import RegistryAuth
from workers.engine.errors import (
    RegistryError,
    certificate_problem,
    error_from_response,
    ssl_cause,
    transport_error,
)
from workers.engine.keychain import AnonymousKeychain, Keychain
from workers.engine.protocols import Coordinator, NoObserver, Observer
from workers.engine.retry import RetryPolicy
from workers.engine.throttle import ThrottledTransport, quota_number
from workers.engine.tls import Scheme, TlsConfig, TlsPolicy

DEFAULT_USER_AGENT = f"ferry/{version('ferry')}"
# Room for blob_concurrency (6) downloads * range parts (4) plus manifests and uploads to
# the same host, so no request waits out the pool timeout behind ranged parts.
MAX_CONNECTIONS_PER_HOST = 32
# Recent response times kept per host; their minimum discounts busy moments.
LATENCY_SAMPLES = 16


@dataclass(frozen=True)
class RateQuota:
    """Docker Hub's pull quota as last reported (``RateLimit-Limit: 100;w=21600``)."""

    limit: int | None
    remaining: int | None

    def nearly_spent(self, fraction: float = 0.1) -> bool:
        if self.remaining is None:
            return False
        if self.limit:
            return self.remaining <= self.limit * fraction
        return self.remaining <= 5


class RegistryTransport:
    """Sends registry API requests; ``request`` retries temporary failures, ``send`` does not."""

    def __init__(
        self,
        *,
        keychain: Keychain | None = None,
        insecure_registries: Iterable[str] = (),
        tls: Mapping[str, TlsConfig] | None = None,
        retry: RetryPolicy | None = None,
        connect_timeout: float = defaults.CONNECT_TIMEOUT,
        read_timeout: float = defaults.READ_TIMEOUT,
        user_agent: str = DEFAULT_USER_AGENT,
        max_connections: int = MAX_CONNECTIONS_PER_HOST,
        coordinator: Coordinator | None = None,
        quota_floor: int = defaults.QUOTA_FLOOR,
        observer: Observer | None = None,
    ) -> None:
        self.keychain: Keychain = keychain or AnonymousKeychain()
        self.tls = TlsPolicy(tls, insecure_registries)
        self.observer: Observer = observer or NoObserver()
        self.retry = retry or RetryPolicy(observer=self.observer)
        self.timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self.user_agent = user_agent
        self.max_connections = max_connections
        # Cluster limits and quota pauses apply to every request on the wire.
        self.coordinator = coordinator
        self.quota_floor = quota_floor
        self._clients: dict[str, httpx.Client] = {}
        # Insecure hosts found not to speak TLS: plain HTTP from then on.
        self._plain: set[str] = set()
        self._retired: list[httpx.Client] = []
        self._quotas: dict[str, RateQuota] = {}
        self._latency: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        self._closed = False

    # -- clients -------------------------------------------------------------------

    def scheme(self, host: str) -> str:
        decided = self.tls.scheme(host)
        if decided is Scheme.HTTP or (decided is Scheme.HTTPS_OR_HTTP and host in self._plain):
            return "http"
        return "https"

    def base_url(self, host: str) -> str:
        return f"{self.scheme(host)}://{host}"

    def client(self, host: str) -> httpx.Client:
        """The pooled client for ``host`` (an API host such as ``registry-1.docker.io``)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("transport is closed")
            client = self._clients.get(host)
            if client is None:
                client = self._clients[host] = self._make_client(host)
            return client

    def _make_client(self, host: str) -> httpx.Client:
        limits = httpx.Limits(
            max_connections=self.max_connections,
            max_keepalive_connections=self.max_connections,
            keepalive_expiry=60.0,
        )
        # retries=0: RetryPolicy is the only place that retries.
        transport: httpx.BaseTransport = httpx.HTTPTransport(verify=self.tls.context(host), limits=limits,
                                                             retries=0)
        if self.coordinator is not None:
            transport = ThrottledTransport(transport, host, self.coordinator, quota_floor=self.quota_floor,
                                           observer=self.observer)
        return httpx.Client(
            base_url=self.base_url(host),
            transport=transport,
            auth=RegistryAuth(host, self.keychain, tls=self.tls.context),
            timeout=self.timeout,
            headers={"User-Agent": self.user_agent},
            # httpx drops Authorization when a redirect leaves the origin (blob storage URLs).
            follow_redirects=True,
        )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            clients, self._clients = [*self._clients.values(), *self._retired], {}
        for c in clients:
            c.close()

    # -- quota ---------------------------------------------------------------------

    def quota(self, host: str) -> RateQuota | None:
        return self._quotas.get(host)

    def meters_pulls(self, host: str) -> bool:
        """Whether ``host`` counts manifest GETs against a quota: Docker Hub, or any registry that
        has sent ``RateLimit`` headers. A manifest GET there is spent only when it is needed."""
        return host == DOCKER_HUB_API or host in self._quotas

    def _note_quota(self, host: str, response: httpx.Response) -> None:
        remaining = quota_number(response.headers.get("RateLimit-Remaining"))
        if remaining is not None:
            limit = quota_number(response.headers.get("RateLimit-Limit"))
            self._quotas[host] = RateQuota(limit, remaining)

    # -- distance ------------------------------------------------------------------

    def response_time(self, host: str) -> float | None:
        """The quickest of ``host``'s recent answers, request to headers, in seconds; None
        before any. Near its round trip time, as long as some answers came while it was idle."""
        with self._lock:
            seen = self._latency.get(host)
            return min(seen) if seen else None

    def _note_latency(self, host: str, seconds: float) -> None:
        with self._lock:
            seen = self._latency.get(host)
            if seen is None:
                seen = self._latency[host] = deque(maxlen=LATENCY_SAMPLES)
            seen.append(seconds)

    # -- requests ------------------------------------------------------------------

    def send(
        self,
        method: str,
        host: str,
        url: str | httpx.URL,
        *,
        ok: Iterable[int] = (200,),
        reference: object = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        content: bytes | Iterable[bytes] | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """One attempt. Statuses outside ``ok`` raise a typed error. With ``stream`` the
        body is left unread and the caller must close the response."""
        client = self.client(host)
        request = client.build_request(method, url, headers=headers, params=params, content=content)
        started = time.monotonic()
        try:
            response = client.send(request, stream=True)
        except httpx.TransportError as exc:
            if self._speaks_no_tls(host, exc) and self._try_plain(host):
                if str(url).startswith(f"https://{host}/"):
                    url = "http" + str(url).removeprefix("https")
                return self.send(method, host, url, ok=ok, reference=reference, headers=headers, params=params,
                                 content=content, stream=stream)
            self.observer.request(host, 0)
            raise transport_error(exc, url=_without_query(request.url), reference=reference) from exc
        except httpx.TooManyRedirects as exc:
            raise RegistryError("too many redirects", url=_without_query(request.url),
                                reference=str(reference) if reference else None) from exc
        self._note_quota(host, response)
        self._note_latency(host, time.monotonic() - started)
        self.observer.request(host, response.status_code)
        try:
            if response.status_code not in set(ok):
                raise error_from_response(response, reference=reference)
            if not stream:
                response.read()
        except httpx.HTTPError as exc:
            response.close()
            raise transport_error(exc, url=_without_query(request.url), reference=reference) from exc
        except BaseException:
            response.close()
            raise
        if not stream:
            response.close()
        return response

    def _speaks_no_tls(self, host: str, exc: httpx.TransportError) -> bool:
        """An insecure host whose TLS handshake failed (an unverified handshake fails only when the
        server does not speak TLS), not yet found to speak plain HTTP."""
        return (isinstance(exc, httpx.ConnectError) and self.tls.scheme(host) is Scheme.HTTPS_OR_HTTP
                and host not in self._plain and ssl_cause(exc) is not None
                and certificate_problem(exc, host) is None)

    def _try_plain(self, host: str) -> bool:
        """Plain HTTP for ``host`` from now on if it answers HTTP, as docker does for insecure
        registries: a registry's answer to ``GET /v2/`` (a 401 too) proves it. TLS servers answer
        plain HTTP with 400, which proves nothing."""
        with httpx.Client(timeout=self.timeout) as probe:
            try:
                answer = probe.get(f"http://{host}/v2/", headers={"User-Agent": self.user_agent})
            except httpx.TransportError:
                return False
        if answer.status_code == 400:
            return False
        with self._lock:
            self._plain.add(host)
            old = self._clients.pop(host, None)
            if old is not None:
                # Other threads may still be in it: closed with the transport.
                self._retired.append(old)
        return True

    def request(
        self,
        method: str,
        host: str,
        url: str | httpx.URL,
        *,
        ok: Iterable[int] = (200,),
        reference: object = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        what: str | None = None,
    ) -> httpx.Response:
        """``send`` with the retry policy; for requests whose body can be sent again."""
        ok = tuple(ok)
        return self.retry.call(
            lambda: self.send(method, host, url, ok=ok, reference=reference, headers=headers,
                              params=params, content=content),
            what=what or f"{method} {host}{url}",
        )

    @contextlib.contextmanager
    def stream(
        self,
        method: str,
        host: str,
        url: str | httpx.URL,
        *,
        ok: Iterable[int] = (200,),
        reference: object = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> Iterator[httpx.Response]:
        """One attempt whose body is read by the caller; closed on exit. A connection cut
        (or an undecodable body) while the body is read raises a typed, temporary error."""
        response = self.send(method, host, url, ok=ok, reference=reference, headers=headers,
                             params=params, stream=True)
        try:
            yield response
        except httpx.HTTPError as exc:
            raise transport_error(exc, url=str(response.request.url.copy_with(query=None)),
                                  reference=reference) from exc
        finally:
            response.close()

    def resolve(self, host: str, location: str) -> str:
        """An absolute URL for a ``Location`` header, which registries may give relative."""
        if location.startswith(("http://", "https://")):
            return location
        if not location.startswith("/"):
            location = "/" + location
        return self.base_url(host) + location


def _without_query(url: httpx.URL) -> str:
    """A request's URL for an error message: its query may carry an upload session's state. Built
    only when there is an error to report (parsing URLs is a noticeable part of a request's cost)."""
    return str(url.copy_with(query=None))
