"""Cluster-wide single flight: one holder of a key at a time, renewed while it lives.

A lease is a Redis key holding its owner's token with a TTL. The holder's process renews
it in the background; if the process dies the key expires and a waiter takes over. A
holder that finishes successfully leaves a short-lived ``done`` marker, so waiters know
the work exists and do not repeat it.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator

import redis

from contract import keys
from workers.cluster.renewer import Renewer

log = logging.getLogger(__name__)

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[2] == '1' then redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3]) end
return 1
"""


class Leases:
    def __init__(self, client: redis.Redis[bytes], renewer: Renewer, *, ttl: float, owner: str,
                 poll: float = 0.1) -> None:
        self.client = client
        self.renewer = renewer
        self.ttl_ms = max(1000, int(ttl * 1000))
        self.owner = owner
        self.poll = poll
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @property
    def done_ms(self) -> int:
        # Long enough for every waiter to notice; the ledger remembers the rest.
        return max(60_000, 2 * self.ttl_ms)

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[bool]:
        """True: held until exit (``done`` marked when the block ends without an error).
        False: another holder finished while we waited. A holder that dies or fails
        is replaced: the wait ends when its lease expires, and we try to take it."""
        done = keys.done(key)
        while True:
            token = f"{self.owner}:{uuid.uuid4().hex}"
            if self.client.set(key, token, nx=True, px=self.ttl_ms):
                break
            waited_for = None
            while (current := self.client.get(key)) is not None:
                waited_for = current
                time.sleep(self.poll)
            # Only the holder we waited for counts, not an older success.
            if waited_for is not None and self.client.get(done) == waited_for:
                yield False
                return
        handle = self.renewer.add(lambda: self._keep(key, token))
        ok = False
        try:
            yield True
            ok = True
        finally:
            self.renewer.remove(handle)
            try:
                self._release(keys=[key, done], args=[token, "1" if ok else "0", self.done_ms])
            except redis.RedisError as exc:  # it expires by itself
                log.warning("lease %s not released: %s", key, exc)

    def _keep(self, key: str, token: str) -> None:
        if not self._renew(keys=[key], args=[token, self.ttl_ms]):
            log.warning("lease %s was lost (expired before renewal); another worker may repeat the work", key)
