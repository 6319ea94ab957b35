"""Celery tasks: thin wrappers that validate payloads, call an engine and record outcomes."""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

from celery import Task
from celery.exceptions import Retry

from config.jobs import SyncJob, SyncResult
from workers import runtime
from workers.app import CLEANUP_TASK, SYNC_TASK, app, node_queue
from workers.batches import BatchStore

log = logging.getLogger("ferry.tasks")


class ImageSyncFailed(Exception):
    """Marks the Celery task FAILED so Flower shows a failed image as a failure."""


class _Progress:
    """Counts bytes moved and publishes the total at most a few times a second."""

    def __init__(self, store: BatchStore, batch_id: str, task_id: str, every: float = 0.3) -> None:
        self.store, self.batch_id, self.task_id, self.every = store, batch_id, task_id, every
        self.total = 0
        self._sent_at = 0.0
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self._lock:
            self.total += n
            now = time.monotonic()
            if now - self._sent_at < self.every:
                return
            self._sent_at = now
            total = self.total
        self._publish(total)

    def flush(self) -> None:
        self._publish(self.total)

    def _publish(self, total: int) -> None:
        try:
            self.store.set_progress(self.batch_id, self.task_id, total)
        except Exception as e:  # progress is advisory; never fail a copy over it
            log.debug("progress not recorded: %s", e)


def _retry_delay(retries: int) -> float:
    return float(min(300, 10 * 2**retries) * random.uniform(0.5, 1.0))


@app.task(name=SYNC_TASK, bind=True, acks_late=True, max_retries=None)
def sync_image(self: Task, job: dict[str, Any]) -> dict[str, Any]:
    j = SyncJob.model_validate(job)
    s = runtime.settings()
    store = runtime.store()
    task_id = self.request.id or ""
    attempt = self.request.retries
    store.record_state(j.batch_id, task_id, f"started on {s.node}" + (f" (retry {attempt})" if attempt else ""))
    progress = _Progress(store, j.batch_id, task_id)
    started = time.time()
    try:
        result = runtime.engine(j.engine).sync(j, progress)
    except Exception as e:  # a bug must still end the image, not hang the batch
        log.exception("sync of %s crashed", j.source)
        result = SyncResult(batch_id=j.batch_id, source=j.source, status="failed",
                            error=f"internal error: {type(e).__name__}: {e}", error_code="INTERNAL")
    progress.flush()
    result = result.model_copy(update={
        "task_id": task_id, "node": s.node, "line": j.line, "engine": j.engine,
        "started_at": started, "duration_s": time.time() - started,
        "cleanup_task_id": _chain_cleanup(j, task_id, s.node, result.local_refs),
    })
    if result.status == "failed" and result.temporary and attempt < s.task_max_retries:
        store.record_state(j.batch_id, task_id, f"retrying: {result.error}")
        try:
            raise self.retry(countdown=_retry_delay(attempt), max_retries=s.task_max_retries)
        except Retry:
            raise
        except Exception as e:  # the retry could not be queued: end the image rather than lose it
            log.warning("retry of %s not queued: %s", j.source, e)
    store.record_result(result)
    if result.status == "failed":
        raise ImageSyncFailed(f"{j.source}: {result.error}")
    return result.model_dump(mode="json")


def _chain_cleanup(job: SyncJob, task_id: str, node: str, remove: list[str]) -> str | None:
    """Follow every sync with a cleanup on this node's own queue, so it runs where the disk filled."""
    try:
        sent = cleanup.apply_async(
            kwargs={"engine": job.engine, "batch_id": job.batch_id, "for_task": task_id, "remove": remove},
            queue=node_queue(node),
        )
        return str(sent.id)
    except Exception as e:
        log.warning("cleanup after %s not queued: %s", task_id, e)
        return None


@app.task(name=CLEANUP_TASK, bind=True, acks_late=True)
def cleanup(self: Task, engine: str = "registry", batch_id: str | None = None,
            for_task: str | None = None, remove: list[str] | None = None) -> dict[str, Any]:
    result = runtime.run_cleanup(engine, remove or [], for_task)
    if batch_id:
        runtime.store().record_cleanup(batch_id, self.request.id or "", result)
    return result.model_dump(mode="json")
