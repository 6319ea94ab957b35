"""Cluster gauges — queue lengths, batches running, workers online — read from Redis at scrape time.

They describe the cluster, not a worker, so exactly one worker's endpoint exports them: the
one holding a short Redis lease, renewed each time it is scraped. The holder keeps it as
long as it is scraped; when it dies (or stops being scraped) the lease lapses within
``LEASE_TTL`` and the next worker scraped takes over. So summing over workers counts each
gauge once; ``max`` over workers is exact even in the one scrape interval of a takeover.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import redis
from kombu.transport.redis import PRIORITY_STEPS, Channel
from prometheus_client.core import GaugeMetricFamily, Metric

from contract import keys
from contract.batches import BatchStore
from workers.metrics.families import BY_NAME
from workers.presence import Presence

log = logging.getLogger("ferry.metrics")

LEASE_KEY = keys.METRICS_LEASE
# Longer than any sensible scrape interval, short enough for a quick takeover.
LEASE_TTL = 45.0

# Take the lease when free, renew it when ours.
_HOLD = """
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


def queue_keys(queue: str) -> list[str]:
    """The Redis lists kombu keeps a queue's messages in, one per priority step."""
    return [queue if p == 0 else f"{queue}{Channel.sep}{p}" for p in PRIORITY_STEPS]


def _gauge(name: str) -> GaugeMetricFamily:
    f = BY_NAME[name]
    return GaugeMetricFamily(f.name, f.help, labels=f.labels or None)


class ClusterCollector:
    def __init__(self, client: redis.Redis[bytes], store: BatchStore, presence: Presence, *, owner: str,
                 sync_queue: str, node_queue: Callable[[str], str], batch_ttl: float) -> None:
        self.client = client
        self.store = store
        self.presence = presence
        self.owner = owner
        self.sync_queue = sync_queue
        self.node_queue = node_queue
        self.batch_ttl = batch_ttl
        self._hold = client.register_script(_HOLD)
        # batch id -> number of tasks: read once per batch (a retry replaces task ids, never adds any).
        self._totals: dict[str, int] = {}
        self._lock = threading.Lock()

    def describe(self) -> Iterable[Metric]:
        return []  # nothing to read at registration

    def collect(self) -> Iterator[Metric]:
        try:
            if not self._hold(keys=[LEASE_KEY], args=[self.owner, int(LEASE_TTL * 1000)]):
                return iter(())
            return iter(self._read())
        except redis.RedisError as exc:
            log.warning("cluster gauges unavailable: %s", exc)
            return iter(())

    def _read(self) -> list[Metric]:
        online = _gauge("ferry_workers_online")
        online.add_metric([], self.presence.online())
        queues = [self.sync_queue, *(self.node_queue(n) for n in self.presence.nodes())]
        with self.client.pipeline(transaction=False) as p:
            for q in queues:
                for k in queue_keys(q):
                    p.llen(k)
            lengths = p.execute()
        length = _gauge("ferry_queue_length")
        steps = len(PRIORITY_STEPS)
        for i, q in enumerate(queues):
            length.add_metric([q], sum(lengths[i * steps:(i + 1) * steps]))
        running = _gauge("ferry_batches_running")
        running.add_metric([], self._running_batches())
        return [online, length, running]

    def _running_batches(self) -> int:
        with self._lock:  # scrapes may overlap
            return self._count_running()

    def _count_running(self) -> int:
        ids = self.store.created_since(time.time() - self.batch_ttl)
        for gone in self._totals.keys() - set(ids):
            del self._totals[gone]
        for b in ids:
            if b not in self._totals:
                meta = self.store.meta(b)
                self._totals[b] = len(meta.task_ids) if meta else 0  # no meta: expired
        counts = self.store.result_counts(ids)
        return sum(n < self._totals[b] for b, n in zip(ids, counts, strict=True))
