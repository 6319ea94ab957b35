"""Small interfaces between the task layer and the engines."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

from config.jobs import SyncJob, SyncResult

# Called with a number of bytes each time some are moved; must be cheap and thread-safe.
ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class CleanupStats:
    """What one cleanup freed on this node, and what it kept."""

    freed_bytes: int = 0
    freed_items: int = 0
    kept_bytes: int = 0
    kept_items: int = 0
    errors: tuple[str, ...] = field(default_factory=tuple)


class Engine(Protocol):
    """Copies one image to each of its destinations, and keeps the node's disk in check."""

    name: str

    def sync(self, job: SyncJob, progress: ProgressFn, *, expect: ProgressFn | None = None) -> SyncResult:
        """``progress`` gets bytes as they move; ``expect`` (when given) the bytes the image will
        move once its manifests are known, less whatever turns out to be there already."""
        ...

    def cleanup(self, remove: Sequence[str] = ()) -> CleanupStats:
        """Apply the node's disk policy; ``remove``: local images a sync left behind (``local_refs``)."""
        ...

    def close(self) -> None: ...


class Coordinator(Protocol):
    """What workers share about registries: where blobs are, who uploads what, how fast to go.

    Registries are named as the engine talks to them (API host, e.g. ``registry-1.docker.io``);
    an implementation folds aliases itself.
    """

    # -- blob ledger: repositories of a destination registry known to hold a digest
    def known_locations(self, registry: str, digest: str) -> list[str]: ...

    def record_blob(self, registry: str, repository: str, digest: str) -> None: ...

    def forget_blob(self, registry: str, repository: str, digest: str) -> None: ...

    # -- single flight: True = held (renewed until exit); False = another holder finished it
    def upload_lease(self, registry: str, digest: str) -> AbstractContextManager[bool]: ...

    def manifest_lease(self, registry: str, repository: str, reference: str) -> AbstractContextManager[bool]: ...

    # -- request limits: held for the life of one HTTP exchange (body included)
    def acquire(self, host: str) -> AbstractContextManager[None]: ...

    def pause_until(self, host: str) -> float | None: ...

    def report_quota(self, host: str, remaining: int | None, reset_at: float) -> None: ...

    def credential_index(self, host: str) -> int: ...


class Observer(Protocol):
    """Told about registry traffic as it happens (metrics); every call must be cheap and thread-safe.

    Registries are named as the engine talks to them (API host)."""

    # One request answered with HTTP status ``code`` (after authentication), or 0 when no answer came.
    def request(self, registry: str, code: int) -> None: ...

    # A temporary failure is about to be tried again.
    def retry(self) -> None: ...

    # A response said the pull quota is spent: requests to ``registry`` wait until ``until`` (epoch s).
    def quota_pause(self, registry: str, until: float) -> None: ...


class NoObserver:
    """The observer of an engine nobody watches."""

    def request(self, registry: str, code: int) -> None:
        pass

    def retry(self) -> None:
        pass

    def quota_pause(self, registry: str, until: float) -> None:
        pass
