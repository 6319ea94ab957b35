"""The engine tells its observer about every request, retry and quota pause, as they happen on the wire."""

from __future__ import annotations

import threading
import time

import pytest

from tests.support.faultproxy import FaultProxy, Rule, hangup, status, too_many_requests
from tests.support.registry import Registry
from workers.engine.errors import RegistryError
from workers.engine.local_coordinator import LocalCoordinator
from workers.engine.retry import RetryPolicy
from workers.engine.transport import RegistryTransport


class Seen:
    """Keeps what it is told (the observer a metrics recorder would be)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, int]] = []
        self.retries = 0
        self.pauses: list[tuple[str, float]] = []
        self._lock = threading.Lock()

    def request(self, registry: str, code: int) -> None:
        with self._lock:
            self.requests.append((registry, code))

    def retry(self) -> None:
        with self._lock:
            self.retries += 1

    def quota_pause(self, registry: str, until: float) -> None:
        with self._lock:
            self.pauses.append((registry, until))


def transport(seen: Seen, attempts: int = 4) -> RegistryTransport:
    return RegistryTransport(retry=RetryPolicy(attempts=attempts, base_delay=0.01, max_delay=0.05, observer=seen),
                             coordinator=LocalCoordinator(), observer=seen)


def test_each_attempt_is_told_with_its_status_or_none(src: Registry) -> None:
    seen = Seen()
    t = transport(seen)
    with FaultProxy(src.host) as proxy:
        proxy.add_rule(Rule(hangup(), method="GET", path_re="^/v2/$", times=1))
        proxy.add_rule(Rule(status(503), method="GET", path_re="^/v2/$", times=1))
        assert t.request("GET", proxy.host, "/v2/").status_code == 200
        with pytest.raises(RegistryError):
            t.request("HEAD", proxy.host, "/v2/nothing/here/manifests/v1")
    t.close()
    # The hang-up got no answer; 503 was retried; the 404 is permanent, so it was not.
    assert seen.requests == [(proxy.host, 0), (proxy.host, 503), (proxy.host, 200), (proxy.host, 404)]
    assert seen.retries == 2 and seen.pauses == []


def test_a_spent_quota_is_told_once_per_response_that_said_so(src: Registry) -> None:
    seen = Seen()
    t = transport(seen)
    with FaultProxy(src.host) as proxy:
        proxy.add_rule(Rule(too_many_requests("1"), method="GET", path_re="^/v2/$", times=1))
        started = time.time()
        assert t.request("GET", proxy.host, "/v2/").status_code == 200
    t.close()
    assert seen.requests == [(proxy.host, 429), (proxy.host, 200)]
    assert seen.retries == 1
    [(registry, until)] = seen.pauses
    assert registry == proxy.host and started + 0.5 < until < time.time() + 1
