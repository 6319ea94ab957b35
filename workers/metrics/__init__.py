"""What a worker counts for Prometheus, as the task layer sees it.

Tasks and the runtime hold a ``Recorder``: ``NoRecorder`` when metrics are off (nothing is
imported, nothing costs), ``workers.metrics.families.PrometheusRecorder`` when a worker serves
them. The engine sees only the ``Observer`` part (workers/engine/protocols.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

from config.jobs import CleanupResult, SyncResult
from workers.engine.protocols import NoObserver, Observer


class Recorder(Observer, Protocol):
    # Held while an image is being copied (the in-flight gauge).
    def in_flight(self) -> contextlib.AbstractContextManager[None]: ...

    # An image's final outcome, as recorded in its batch.
    def image_finished(self, result: SyncResult) -> None: ...

    # An image failed temporarily and its task was queued to run again.
    def image_retrying(self) -> None: ...

    def cleanup_finished(self, result: CleanupResult) -> None: ...


class NoRecorder(NoObserver):
    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        yield

    def image_finished(self, result: SyncResult) -> None:
        pass

    def image_retrying(self) -> None:
        pass

    def cleanup_finished(self, result: CleanupResult) -> None:
        pass

