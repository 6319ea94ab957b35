"""The one way ferry opens a Redis client (batch store, cluster coordination).

One set of timeouts for every caller: coordination sits in front of registry requests, so a
Redis that stops answering must cost seconds, not minutes; batch reads and writes are small.
"""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

SOCKET_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
# Ping a connection idle this long before using it, so one dropped by a Redis restart is replaced.
HEALTH_CHECK_INTERVAL = 10


def redis_client(url: str, *, ride_out: float = 0.0) -> redis.Redis[bytes]:
    """A client for ``url``. ``ride_out``: seconds to keep retrying through an outage (a worker's
    outcome write must survive a Redis restart); 0 fails at once — the producer reports or polls
    again, and coordination fails open."""
    if ride_out > 0:
        retry = Retry(ExponentialBackoff(cap=2.0, base=0.2), retries=int(ride_out / 2) + 4)
    else:
        retry = Retry(NoBackoff(), retries=0)
    return redis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=CONNECT_TIMEOUT,
                                health_check_interval=HEALTH_CHECK_INTERVAL, retry=retry,
                                retry_on_error=[RedisConnectionError, RedisTimeoutError])
