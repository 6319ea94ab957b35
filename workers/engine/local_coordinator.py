"""What an engine knows within its own process.

``BlobTracker`` remembers where blobs were seen and which uploads are in flight; the engine
keeps one whether or not it shares a cluster. ``LocalCoordinator`` is the coordinator of
an engine that runs alone: nothing is shared beyond this process, so its ledger and leases
are empty (the tracker covers them); quota pauses are still honoured by this process's threads.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator

# Remembered (registry, digest) → repositories, for mounts; oldest forgotten first.
SEEN_LIMIT = 200_000


class BlobTracker:
    """Per process: where each digest was seen on each destination registry, and which
    (registry, digest) uploads are in flight, so the same blob is never sent twice at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: OrderedDict[tuple[str, str], list[str]] = OrderedDict()
        self._flight: dict[tuple[str, str], tuple[threading.Lock, int]] = {}

    def note(self, host: str, digest: str, repository: str) -> None:
        key = (host, digest)
        with self._lock:
            repos = self._seen.pop(key, [])
            if repository not in repos:
                repos = [repository, *repos][:8]
            self._seen[key] = repos
            while len(self._seen) > SEEN_LIMIT:
                self._seen.popitem(last=False)

    def repositories(self, host: str, digest: str) -> list[str]:
        with self._lock:
            return list(self._seen.get((host, digest), ()))

    def forget(self, host: str, digest: str, repository: str) -> None:
        with self._lock:
            repos = self._seen.get((host, digest))
            if repos and repository in repos:
                repos.remove(repository)

    @contextlib.contextmanager
    def exclusive(self, host: str, digest: str) -> Iterator[None]:
        """Wait while another thread copies this digest to this registry, then hold it."""
        key = (host, digest)
        with self._lock:
            lock, users = self._flight.get(key, (threading.Lock(), 0))
            self._flight[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                lock, users = self._flight[key]
                if users == 1:
                    del self._flight[key]
                else:
                    self._flight[key] = (lock, users - 1)


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
