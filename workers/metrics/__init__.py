"""What a worker counts for Prometheus, as the task layer sees it.

Tasks and the runtime hold a ``Recorder``: ``NoRecorder`` when metrics are off (nothing is
imported, nothing costs), ``workers.metrics.families.PrometheusRecorder`` when a worker serves
them. The engine sees only the ``Observer`` part (workers/engine/protocols.py).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
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


def default_directory(port: int) -> Path:
    """One directory per port: two workers on a machine never share (or empty) each other's."""
    return Path(tempfile.gettempdir()) / f"ferry-metrics-{port}"


def use_directory(path: Path) -> None:
    """Make ``path`` where this worker's processes keep their counts, emptied of an earlier run's.

    Must run before prometheus_client is first imported: it picks its storage then."""
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.db"):
        old.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
