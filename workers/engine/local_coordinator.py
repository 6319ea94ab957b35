"""The coordinator of an engine that runs alone: nothing is shared beyond this process.

The engine keeps its own per-process blob tracker and in-flight map, so the ledger and
leases here are empty; quota pauses are still honoured by the threads of this process.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator


class LocalCoordinator:
    def __init__(self) -> None:
        self._pauses: dict[str, float] = {}
        self._lock = threading.Lock()

    def known_locations(self, registry: str, digest: str) -> list[str]:
        return []

    def record_blob(self, registry: str, repository: str, digest: str) -> None:
        pass

    def forget_blob(self, registry: str, repository: str, digest: str) -> None:
        pass

    @contextlib.contextmanager
    def upload_lease(self, registry: str, digest: str) -> Iterator[bool]:
        yield True

    @contextlib.contextmanager
    def manifest_lease(self, registry: str, repository: str, reference: str) -> Iterator[bool]:
        yield True

    @contextlib.contextmanager
    def acquire(self, host: str) -> Iterator[None]:
        until = self.pause_until(host)
        while until is not None and (left := until - time.time()) > 0:
            time.sleep(min(left, 1.0))
            until = self.pause_until(host)
        yield

    def pause_until(self, host: str) -> float | None:
        with self._lock:
            until = self._pauses.get(host)
            if until is not None and until <= time.time():
                del self._pauses[host]
                return None
            return until

    def report_quota(self, host: str, remaining: int | None, reset_at: float) -> None:
        with self._lock:
            self._pauses[host] = max(reset_at, self._pauses.get(host, 0.0))

    def credential_index(self, host: str) -> int:
        return 0
