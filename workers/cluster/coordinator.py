"""The Redis-backed ``Coordinator`` of a worker process (see workers/engine/protocols.py).

Coordination helps but must never stop a copy: when Redis cannot be reached, lookups
answer "unknown", leases count as held and limits as free, and the per-process
safeguards of the engine (in-flight map, retries) carry on alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

import redis

from config import defaults
from config.reference import canonical_registry
from contract import keys
from contract.redis_client import redis_client
from workers.cluster.leases import Leases
from workers.cluster.ledger import BlobLedger
from workers.cluster.quota import QuotaBoard
from workers.cluster.ratelimit import Limit, RateLimiter
from workers.cluster.renewer import Renewer

log = logging.getLogger(__name__)
T = TypeVar("T")

# How stale this process's view of a quota pause may be for a registry without limits.
PAUSE_RECHECK = 0.25
# Docker Hub counts and throttles hard; unless configured otherwise stay well below it.
DEFAULT_LIMITS = {"docker.io": Limit(max_concurrency=16, requests_per_second=10.0)}


class RedisCoordinator:
    def __init__(
        self,
        client: redis.Redis[bytes],
        *,
        owner: str | None = None,
        ledger_ttl: float = defaults.LEDGER_TTL,
        lease_ttl: float = defaults.LEASE_TTL,
        limits: Mapping[str, Limit] | None = None,
        credential_counts: Mapping[str, int] | None = None,
    ) -> None:
        self.client = client
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.renewer = Renewer(interval=max(0.2, lease_ttl / 3))
        self.ledger = BlobLedger(client, ledger_ttl)
        self.leases = Leases(client, self.renewer, ttl=lease_ttl, owner=self.owner)
        merged = dict(DEFAULT_LIMITS)
        for host, limit in (limits or {}).items():
            reg = canonical_registry(host)
            base = merged.get(reg, Limit())
            # A setting given for one limit keeps the default of the other.
            merged[reg] = Limit(limit.max_concurrency or base.max_concurrency,
                                limit.requests_per_second or base.requests_per_second, limit.burst)
        self.limiter = RateLimiter(client, self.renewer, merged, slot_ttl=max(3 * lease_ttl, 10.0))
        self.quota = QuotaBoard(client, {canonical_registry(k): v for k, v in (credential_counts or {}).items()})
        # registry -> (when looked up, paused until): quota pauses of unlimited registries.
        self._pauses: dict[str, tuple[float, float]] = {}
        # registry -> (when looked up, credential in use): read by auth on every request.
        self._indexes: dict[str, tuple[float, int]] = {}
        self._pauses_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, **kw: object) -> RedisCoordinator:
        return cls(redis_client(url), **kw)  # type: ignore[arg-type]

    def close(self) -> None:
        self.renewer.close()
        self.client.close()

    def _soft(self, what: str, fn: Callable[[], T], fallback: T) -> T:
        try:
            return fn()
        except redis.RedisError as exc:
            log.warning("coordination unavailable (%s): %s", what, exc)
            return fallback

    # -- ledger

    def known_locations(self, registry: str, digest: str) -> list[str]:
        reg = canonical_registry(registry)
        return self._soft("ledger", lambda: self.ledger.locations(reg, digest), [])

    def record_blob(self, registry: str, repository: str, digest: str) -> None:
        reg = canonical_registry(registry)
        self._soft("ledger", lambda: self.ledger.record(reg, repository, digest), None)

    def forget_blob(self, registry: str, repository: str, digest: str) -> None:
        reg = canonical_registry(registry)
        self._soft("ledger", lambda: self.ledger.forget(reg, repository, digest), None)

    # -- leases

    @contextlib.contextmanager
    def _lease(self, key: str) -> Iterator[bool]:
        try:
            cm = self.leases.hold(key)
            held = cm.__enter__()
        except redis.RedisError as exc:
            log.warning("coordination unavailable (lease %s): %s", key, exc)
            yield True
            return
        with contextlib.ExitStack() as stack:
            stack.push(cm)
            yield held

    def upload_lease(self, registry: str, digest: str) -> contextlib.AbstractContextManager[bool]:
        return self._lease(keys.blob_lease(canonical_registry(registry), digest))

    def manifest_lease(self, registry: str, repository: str,
                       reference: str) -> contextlib.AbstractContextManager[bool]:
        return self._lease(keys.manifest_lease(canonical_registry(registry), repository, reference))

    # -- limits and quota

    @contextlib.contextmanager
    def acquire(self, host: str) -> Iterator[None]:
        reg = canonical_registry(host)
        if not self.limiter.limited(reg):
            # No cluster limit for this registry: only a quota pause can hold a request back,
            # and that is looked up at most every PAUSE_RECHECK seconds, not per request.
            self._wait_out_pause(reg)
            yield
            return
        try:
            # The credential auth uses right now, from the cached view: no extra round trip per request.
            cm = self.limiter.acquire(reg, keys.pause(reg, self.credential_index(reg)))
            cm.__enter__()
        except redis.RedisError as exc:
            log.warning("coordination unavailable (limits for %s): %s", reg, exc)
            yield
            return
        with contextlib.ExitStack() as stack:
            stack.push(cm)
            yield

    def pause_until(self, host: str) -> float | None:
        reg = canonical_registry(host)
        return self._soft("quota", lambda: self.quota.pause_until(reg), None)

    def _wait_out_pause(self, reg: str) -> None:
        while (wait := self._known_pause(reg) - time.time()) > 0:
            time.sleep(min(wait, 1.0) + random.uniform(0, 0.01))

    def _known_pause(self, reg: str) -> float:
        now = time.monotonic()
        with self._pauses_lock:
            seen = self._pauses.get(reg)
        if seen is not None and now - seen[0] < PAUSE_RECHECK:
            return seen[1]
        until = self._soft("quota", lambda: self.quota.pause_until(reg), None) or 0.0
        with self._pauses_lock:
            self._pauses[reg] = (now, until)
        return until

    def report_quota(self, host: str, remaining: int | None, reset_at: float) -> None:
        reg = canonical_registry(host)
        used = self.credential_index(reg)
        with self._pauses_lock:
            self._pauses[reg] = (time.monotonic(), reset_at)
        index = self._soft("quota", lambda: self.quota.report(reg, used, reset_at), None)
        with self._pauses_lock:
            now = time.monotonic()
            if index is None:
                self._indexes.pop(reg, None)
            else:
                self._indexes[reg] = (now, int(index))
                # Moved on to a fresh credential: nothing to wait for.
                self._pauses[reg] = (now, reset_at if int(index) == used else 0.0)

    def credential_index(self, host: str) -> int:
        reg = canonical_registry(host)
        now = time.monotonic()
        with self._pauses_lock:
            seen = self._indexes.get(reg)
        if seen is not None and now - seen[0] < PAUSE_RECHECK:
            return seen[1]
        index = self._soft("quota", lambda: self.quota.credential_index(reg), 0)
        with self._pauses_lock:
            self._indexes[reg] = (now, index)
        return index
