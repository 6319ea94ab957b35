"""One redis-py client per kombu channel and connection pool, instead of one per call.

kombu's Redis channel builds a new redis-py client object for every message acknowledgement and
every event it publishes; redis-py's constructor copies its table of response callbacks each time,
about a tenth of a busy worker's CPU on a fleet of small images. The client is only a handle on the
channel's connection pool (and safe to share between threads), so one per pool serves them all: a
pool replaced after a fork or a reconnect gets a client of its own.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


def reuse_channel_clients() -> None:
    original: Any = getattr(kombu_redis.Channel, "_create_client", None)
    # A kombu that builds its clients otherwise keeps its own way: this only saves CPU.
    if original is None or getattr(original, "reuses_clients", False):
        return

    def create_client(self: Any, asynchronous: bool = False) -> Any:
        if asynchronous:
            return original(self, asynchronous=True)
        pool = self.pool
        cached = self.__dict__.get("_ferry_client")
        if cached is None or cached[0] is not pool:
            cached = (pool, original(self))
            self.__dict__["_ferry_client"] = cached
        return cached[1]

    create_client.reuses_clients = True  # type: ignore[attr-defined]
    kombu_redis.Channel._create_client = create_client  # type: ignore[method-assign]
