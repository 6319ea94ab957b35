"""Which repositories of a destination registry hold which blobs, shared by every worker.

Recorded after a push, a mount or a HEAD that found the blob; entries age out after
``ttl`` (registries garbage-collect) and are removed when a mount or HEAD proves them wrong.
"""

from __future__ import annotations

import time

import redis

from contract import keys

# Mount candidates tried per blob; more would only cost requests.
MAX_LOCATIONS = 8


class BlobLedger:
    def __init__(self, client: redis.Redis[bytes], ttl: float) -> None:
        self.client = client
        self.ttl_ms = int(ttl * 1000)

    def locations(self, registry: str, digest: str) -> list[str]:
        """Repositories known to hold ``digest``, most recently confirmed first."""
        oldest = int(time.time() * 1000) - self.ttl_ms
        found = self.client.zrevrangebyscore(keys.ledger(registry, digest), "+inf", oldest,
                                             start=0, num=MAX_LOCATIONS)
        return [r.decode() if isinstance(r, bytes) else str(r) for r in found]

    def record(self, registry: str, repository: str, digest: str) -> None:
        key = keys.ledger(registry, digest)
        now = int(time.time() * 1000)
        with self.client.pipeline(transaction=False) as p:
            p.zadd(key, {repository: now})
            p.zremrangebyscore(key, "-inf", now - self.ttl_ms)
            p.pexpire(key, self.ttl_ms)
            p.execute()

    def forget(self, registry: str, repository: str, digest: str) -> None:
        self.client.zrem(keys.ledger(registry, digest), repository)
