"""Small interfaces between the task layer and the engines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from config.jobs import SyncJob, SyncResult

# Called with a number of bytes each time some are moved; must be cheap and thread-safe.
ProgressFn = Callable[[int], None]


class Engine(Protocol):
    """Copies one image to each of its destinations."""

    name: str

    def sync(self, job: SyncJob, progress: ProgressFn) -> SyncResult: ...

    def close(self) -> None: ...
