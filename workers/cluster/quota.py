"""Pull-quota pauses and credential rotation per registry, shared by every worker.

A pause belongs to the credential that ran out: with several credentials for a
registry, the spent one is paused and every worker moves on to the next one that is
not; with one (or all spent), the registry waits for the reset.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import redis

from contract import keys

_REPORT = """
local n = #KEYS - 1
local used = tonumber(ARGV[1])
local until_ms = tonumber(ARGV[2])
local pk = KEYS[2 + used]
if until_ms > tonumber(redis.call('GET', pk) or '0') then
  redis.call('SET', pk, until_ms, 'PXAT', until_ms)
end
local cur = tonumber(redis.call('GET', KEYS[1]) or '0') % n
if cur ~= used or n == 1 then return cur end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for step = 1, n - 1 do
  local j = (used + step) % n
  if tonumber(redis.call('GET', KEYS[2 + j]) or '0') <= now then
    redis.call('SET', KEYS[1], j)
    return j
  end
end
return cur
"""


class QuotaBoard:
    def __init__(self, client: redis.Redis[bytes], credential_counts: Mapping[str, int]) -> None:
        self.client = client
        self.counts = {k: max(1, v) for k, v in credential_counts.items()}
        self._report = client.register_script(_REPORT)

    def credential_index(self, registry: str) -> int:
        n = self.counts.get(registry, 1)
        if n == 1:
            return 0
        return int(self.client.get(keys.credential(registry)) or 0) % n

    def pause_until(self, registry: str) -> float | None:
        value = self.client.get(keys.pause(registry, self.credential_index(registry)))
        until = int(value) / 1000 if value else None
        return until if until is not None and until > time.time() else None

    def report(self, registry: str, used: int, reset_at: float) -> int:
        """Pause credential ``used`` until ``reset_at``; returns the index to use now.

        ``used`` is the credential the refused request went out with, not the current one:
        another worker may have rotated already, and the fresh credential must stay unpaused."""
        n = self.counts.get(registry, 1)
        return int(self._report(
            keys=[keys.credential(registry), *(keys.pause(registry, i) for i in range(n))],
            args=[used % n, int(reset_at * 1000)]))
