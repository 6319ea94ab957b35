"""Node upkeep inside a worker: a periodic cleanup, and a disk floor that pauses intake.

A Celery consumer bootstep with two timers on the worker's event loop:

- every ``cleanup_interval`` seconds it sends ``ferry.cleanup`` to this node's own queue,
  so the cache policy runs even when no sync chains a cleanup;
- every ``check_interval`` seconds it looks at the free space of the cache filesystem.
  Below ``min_free_bytes`` the worker stops consuming the shared queue (tasks stay queued
  for other nodes; nothing fails) and asks for a cleanup; once space is back it resumes.
  The node queue is always consumed, so the cleanup itself still runs.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import bootsteps

from config.describe import cleanup_task_name

log = logging.getLogger("ferry.upkeep")


@dataclass(frozen=True)
class UpkeepConfig:
    node: str
    engine: str
    cache_dir: Path
    min_free_bytes: int
    sync_queue: str
    node_queue: str
    cleanup_task: str
    cleanup_interval: float
    check_interval: float


def free_bytes(path: Path) -> int:
    """Free space of the filesystem ``path`` is on (or will be, if not created yet)."""
    for p in (path, *path.parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return shutil.disk_usage("/").free


def make_upkeep_step(config: UpkeepConfig) -> type[bootsteps.StartStopStep]:
    class NodeUpkeep(bootsteps.StartStopStep):  # type: ignore[misc]
        requires = {"celery.worker.consumer.tasks:Tasks"}

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.paused = False
            self.timers: list[Any] = []
            self.asked_at = 0.0

        def start(self, c: Any) -> None:
            if config.cleanup_interval > 0:
                self.timers.append(c.timer.call_repeatedly(config.cleanup_interval, self.cleanup, (c, "periodic")))
            if config.check_interval > 0:
                self.timers.append(c.timer.call_repeatedly(config.check_interval, self.check_disk, (c,)))

        def stop(self, c: Any) -> None:
            for t in self.timers:
                t.cancel()
            self.timers.clear()

        def cleanup(self, c: Any, why: str) -> None:
            try:
                c.app.send_task(config.cleanup_task, kwargs={"engine": config.engine},
                                queue=config.node_queue, shadow=cleanup_task_name(config.node, why))
            except Exception as exc:  # the broker may be away; the next round tries again
                log.warning("periodic cleanup not queued: %s", exc)

        def check_disk(self, c: Any) -> None:
            free = free_bytes(config.cache_dir)
            low = free < config.min_free_bytes
            if low and not self.paused:
                log.warning("%s: %d bytes free under the floor of %d; taking no new images until "
                            "cleanup frees space", config.node, free, config.min_free_bytes)
                c.cancel_task_queue(config.sync_queue)
                self.paused = True
            elif not low and self.paused:
                log.info("%s: %d bytes free again; taking images", config.node, free)
                c.add_task_queue(config.sync_queue)
                self.paused = False
            # While low, ask for a cleanup now and then, not at every check.
            if low and time.monotonic() - self.asked_at >= max(10.0, config.check_interval):
                self.asked_at = time.monotonic()
                self.cleanup(c, "disk low")

    return NodeUpkeep
