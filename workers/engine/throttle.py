"""Holds every HTTP exchange with a registry to the cluster's limits and quota pauses.

It wraps the httpx transport of one registry client, so each request on the wire — auth
retries included — takes a slot and a token from the coordinator, and keeps the slot
until its response body is closed. Responses that say the pull quota is spent (a 429,
or ``RateLimit-Remaining`` under the floor) pause that registry for the whole cluster.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterator

import httpx

from config import defaults
from workers.engine.errors import parse_retry_after
from workers.engine.protocols import Coordinator, NoObserver, Observer

log = logging.getLogger(__name__)

# A 429 that gives no hint of when to come back pauses the registry this long.
DEFAULT_PAUSE = 2.0
_WINDOW = re.compile(r";\s*w=(\d+)")


def quota_number(value: str | None) -> int | None:
    """The first number of a ``RateLimit-*`` header (``100;w=21600`` -> 100), or None."""
    if not value:
        return None
    try:
        return int(value.split(";", 1)[0].split(",", 1)[0].strip())
    except ValueError:
        return None


def quota_reset(response: httpx.Response, floor: int, now: float | None = None) -> tuple[int | None, float] | None:
    """(remaining, reset time) when ``response`` says to stop asking this registry, else None.

    The reset comes from ``Retry-After``, else ``RateLimit-Reset`` (seconds from now, or an
    epoch time), else the window of ``RateLimit-Limit: 100;w=21600``.
    """
    now = time.time() if now is None else now
    headers = response.headers
    remaining = quota_number(headers.get("RateLimit-Remaining"))
    if response.status_code != 429 and (remaining is None or remaining >= floor):
        return None
    after = parse_retry_after(headers.get("Retry-After"), now)
    if after is not None:
        return remaining, now + after
    reset = headers.get("RateLimit-Reset")
    if reset:
        with contextlib.suppress(ValueError):
            value = float(reset.strip())
            return remaining, value if value > 1e9 else now + value
    window = _WINDOW.search(headers.get("RateLimit-Limit", ""))
    if window:
        return remaining, now + int(window.group(1))
    return remaining, now + DEFAULT_PAUSE


class _ReleasingStream(httpx.SyncByteStream):
    """A response body that gives its slot back when closed."""

    def __init__(self, inner: httpx.SyncByteStream, release: Callable[[], None]) -> None:
        self._inner = inner
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> Iterator[bytes]:
        yield from self._inner

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


class ThrottledTransport(httpx.BaseTransport):
    def __init__(self, inner: httpx.BaseTransport, host: str, coordinator: Coordinator, *,
                 quota_floor: int = defaults.QUOTA_FLOOR, observer: Observer | None = None) -> None:
        self.inner = inner
        self.host = host
        self.coordinator = coordinator
        self.quota_floor = quota_floor
        self.observer: Observer = observer or NoObserver()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.netloc.decode("ascii") != self.host:
            return self.inner.handle_request(request)  # a redirect to blob storage elsewhere
        stack = contextlib.ExitStack()
        stack.enter_context(self.coordinator.acquire(self.host))
        try:
            response = self.inner.handle_request(request)
            spent = quota_reset(response, self.quota_floor)
            if spent is not None:
                log.warning("%s: pull quota spent (remaining %s); pausing requests for %.0fs",
                            self.host, spent[0], spent[1] - time.time())
                self.coordinator.report_quota(self.host, spent[0], spent[1])
                self.observer.quota_pause(self.host, spent[1])
        except BaseException:
            stack.close()
            raise
        assert isinstance(response.stream, httpx.SyncByteStream)
        response.stream = _ReleasingStream(response.stream, stack.close)
        return response

    def close(self) -> None:
        self.inner.close()
