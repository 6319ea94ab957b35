"""Per-registry request limits for the whole cluster: concurrent requests and requests/s.

One Lua script decides atomically, on Redis' clock: the registry is not paused (quota),
a request slot is free, and the token bucket has a token. Otherwise it answers how many
milliseconds to wait. Slots expire unless renewed, so a dead worker's slots come back.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import redis

from contract import keys
from workers.cluster.renewer import Renewer

log = logging.getLogger(__name__)

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local paused = tonumber(redis.call('GET', KEYS[3]) or '0')
if paused > now then return paused - now end
local rate, burst, maxc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local slot_ttl = tonumber(ARGV[5])
if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= maxc then return 20 end
end
if rate > 0 then
  local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
  local tokens = tonumber(b[1]) or burst
  local ts = tonumber(b[2]) or now
  tokens = math.min(burst, tokens + (now - ts) * rate / 1000)
  if tokens < 1 then return math.max(1, math.ceil((1 - tokens) * 1000 / rate)) end
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'ts', now)
  redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 60000)
end
if maxc > 0 then
  redis.call('ZADD', KEYS[2], now + slot_ttl, ARGV[4])
  redis.call('PEXPIRE', KEYS[2], slot_ttl * 2)
end
return 0
"""
_RENEW_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1])
"""


@dataclass(frozen=True)
class Limit:
    """``max_concurrency`` requests in flight and ``requests_per_second`` (None: unlimited).
    ``burst`` tokens may be spent at once after a quiet period."""

    max_concurrency: int | None = None
    requests_per_second: float | None = None
    burst: float = 1.0


class RateLimiter:
    def __init__(self, client: redis.Redis[bytes], renewer: Renewer, limits: Mapping[str, Limit], *,
                 slot_ttl: float = 60.0) -> None:
        self.client = client
        self.renewer = renewer
        self.limits = dict(limits)
        self.slot_ttl_ms = int(slot_ttl * 1000)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW_SLOT)

    def limited(self, registry: str) -> bool:
        limit = self.limits.get(registry)
        return limit is not None and bool(limit.max_concurrency or limit.requests_per_second)

    def wait_ms(self, registry: str, pause_key: str, slot: str) -> int:
        """0 when a request may start now (and its slot is taken), else how long to wait."""
        limit = self.limits.get(registry, Limit())
        return int(self._acquire(
            keys=[keys.bucket(registry), keys.slots(registry), pause_key],
            args=[limit.requests_per_second or 0, max(1.0, limit.burst), limit.max_concurrency or 0,
                  slot, self.slot_ttl_ms]))

    @contextlib.contextmanager
    def acquire(self, registry: str, pause_key: str) -> Iterator[None]:
        slot = uuid.uuid4().hex
        while (wait := self.wait_ms(registry, pause_key, slot)) > 0:
            # Jitter keeps waiting workers from asking in lockstep.
            time.sleep(min(wait, 1000) / 1000 + random.uniform(0, 0.01))
        limited = bool(self.limits.get(registry, Limit()).max_concurrency)
        if not limited:
            yield
            return
        key = keys.slots(registry)
        handle = self.renewer.add(lambda: self._renew(keys=[key], args=[slot, self.slot_ttl_ms]))
        try:
            yield
        finally:
            self.renewer.remove(handle)
            try:
                self.client.zrem(key, slot)
            except redis.RedisError as exc:  # the slot expires by itself
                log.warning("request slot for %s not released: %s", registry, exc)
