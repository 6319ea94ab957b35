"""Which workers are online: each reports in to Redis every few seconds from its event loop.

A sorted set ``ferry:workers`` maps each worker (``node@host``) to when it last reported.
Online means reported within ``ONLINE_WINDOW``; a worker that stops cleanly leaves at once,
one that dies drops out after the window. Entries older than a day are forgotten; until then
their node queues are still watched (cleanups may wait there).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from celery import bootsteps

from contract import keys
from contract.redis_client import redis_client

log = logging.getLogger("ferry.presence")

KEY = keys.WORKERS
BEAT_INTERVAL = 10.0
ONLINE_WINDOW = 3 * BEAT_INTERVAL
FORGET_AFTER = 24 * 3600.0


def node_of(worker: str) -> str:
    return worker.split("@", 1)[0]


class Presence:
    def __init__(self, client: redis.Redis[bytes]) -> None:
        self.client = client

    @classmethod
    def from_url(cls, url: str) -> Presence:
        return cls(redis_client(url))

    def beat(self, worker: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.client.pipeline() as p:
            p.zadd(KEY, {worker: now})
            p.zremrangebyscore(KEY, "-inf", now - FORGET_AFTER)
            p.execute()

    def leave(self, worker: str) -> None:
        self.client.zrem(KEY, worker)

    def online(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        return int(self.client.zcount(KEY, now - ONLINE_WINDOW, "+inf"))

    def online_nodes(self, now: float | None = None) -> set[str]:
        now = time.time() if now is None else now
        return {node_of(m.decode()) for m in self.client.zrangebyscore(KEY, now - ONLINE_WINDOW, "+inf")}

    def nodes(self) -> list[str]:
        """Every node seen within the last day."""
        return sorted({node_of(m.decode()) for m in self.client.zrange(KEY, 0, -1)})

    def close(self) -> None:
        self.client.close()


def make_presence_step(url: str) -> type[bootsteps.StartStopStep]:
    class WorkerPresence(bootsteps.StartStopStep):  # type: ignore[misc]
        requires = {"celery.worker.consumer.tasks:Tasks"}

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.presence: Presence | None = None
            self.timer: Any = None

        def start(self, c: Any) -> None:
            self.presence = Presence.from_url(url)
            self.beat(c)
            self.timer = c.timer.call_repeatedly(BEAT_INTERVAL, self.beat, (c,))

        def stop(self, c: Any) -> None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            if self.presence is not None:
                try:
                    self.presence.leave(c.hostname)
                except redis.RedisError as exc:
                    log.warning("could not sign off: %s", exc)
                self.presence.close()
                self.presence = None

        def beat(self, c: Any) -> None:
            assert self.presence is not None
            try:
                self.presence.beat(c.hostname)
            except redis.RedisError as exc:  # Redis may be restarting; the next beat tries again
                log.warning("could not report in: %s", exc)

    return WorkerPresence
