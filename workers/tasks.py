"""Celery tasks: thin wrappers that validate payloads, call an engine and record outcomes."""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

from celery import Task
from celery.exceptions import Retry

from config import describe
from config.expansion import ExpandJob, ExpandResult
from config.jobs import RequestRetry, SyncJob, SyncResult, TaskState
from config.schedules import ScheduleFiring
from contract.batches import BatchStore
from contract.broker import CLEANUP_TASK, EXPAND_TASK, SCHEDULE_TASK, SYNC_TASK, node_queue
from contract.dispatch import publish
from workers import runtime
from workers.app import app
from workers.engine.errors import RegistryError
from workers.engine.registry import RegistryEngine
from workers.engine.retry import watching
from workers.expand import expand
from workers.schedules import fire

log = logging.getLogger("ferry.tasks")


class ImageSyncFailed(Exception):
    """An image that failed for a reason a person can act on (not found, denied, corrupt content,
    a registry that stayed down): the task ends FAILED with that reason as its exception text."""

    def __repr__(self) -> str:  # Celery's log line and Flower's exception field show repr()
        return str(self)


class SyncTask(Task):  # type: ignore[misc]
    # Expected failures: Celery logs them as one INFO line, without a traceback.
    throws = (ImageSyncFailed,)

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        if isinstance(exc, ImageSyncFailed):
            # Flower's failed event and the stored result get the reason, not this module's frames:
            # the same einfo goes on to the worker's main process, which sends the event.
            einfo.traceback = None
            self.backend.mark_as_failure(task_id, exc, traceback=None, request=self.request, call_errbacks=False)


class _Progress:
    """Counts bytes moved (and expected) and publishes them at most a few times a second."""

    def __init__(self, store: BatchStore, batch_id: str, task_id: str, every: float = 0.3) -> None:
        self.store, self.batch_id, self.task_id, self.every = store, batch_id, task_id, every
        self.total = 0
        self.expected: int | None = None
        self._sent_at = 0.0
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self._lock:
            self.total += n
        self._maybe_publish()

    def expect(self, n: int) -> None:
        with self._lock:
            self.expected = (self.expected or 0) + n
        self._maybe_publish()

    def _maybe_publish(self) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._sent_at < self.every:
                return
            self._sent_at = now
        self.flush()

    def flush(self) -> None:
        with self._lock:
            total, expected = self.total, self.expected
        try:
            self.store.set_progress(self.batch_id, self.task_id, total, expected)
        except Exception as e:  # progress is advisory; never fail a copy over it
            log.debug("progress not recorded: %s", e)


class _RequestRetries:
    """Publishes the task's state while one of its requests waits to be sent again, so the live
    view and ``status`` say a registry is being retried instead of showing a stalled bar."""

    def __init__(self, store: BatchStore, batch_id: str, task_id: str, running: TaskState) -> None:
        self.store, self.batch_id, self.task_id, self.running = store, batch_id, task_id, running
        self._lock = threading.Lock()
        self._shown = False

    def retrying(self, what: str, failure: int, attempts: int, pause: float, error: RegistryError) -> None:
        request = RequestRetry(what=what, failure=failure, attempts=attempts, retry_at=time.time() + pause,
                               reason=str(error))
        self._record(self.running.model_copy(update={"request": request}), shown=True)

    def recovered(self, what: str) -> None:
        if self._shown:
            self._record(self.running, shown=False)

    def _record(self, state: TaskState, *, shown: bool) -> None:
        with self._lock:
            self._shown = shown
            try:
                self.store.record_state(self.batch_id, self.task_id, state)
            except Exception as e:  # advisory, like progress
                log.debug("state not recorded: %s", e)


# The longest pause between two runs of one image's task.
MAX_TASK_RETRY_DELAY = 300.0


def retry_delay(retries: int, base: float) -> float:
    """Pause before run ``retries + 2`` of a task: ``base``, 2x, 4x... (at most 5 min), each up to
    a quarter longer, so the retries of images that failed together do not arrive together."""
    return float(min(MAX_TASK_RETRY_DELAY, base * 2**retries) * random.uniform(1.0, 1.25))


# The outcome goes to the batch store, and Flower reads it from the task's events: a success stored
# in the result backend too would be a write (and Redis memory per image) nothing reads. Failures
# are still stored, for Flower's result page.
@app.task(name=SYNC_TASK, bind=True, base=SyncTask, acks_late=True, max_retries=None, ignore_result=True,
          store_errors_even_if_ignored=True)
def sync_image(self: Task, job: dict[str, Any], first_started_at: float | None = None) -> dict[str, Any]:
    j = SyncJob.model_validate(job)
    s = runtime.settings()
    store = runtime.store()
    task_id = self.request.id or ""
    attempt = self.request.retries
    runs = s.task_max_retries + 1
    metrics = runtime.recorder()
    started = time.time()
    running = TaskState(phase="running", node=s.node, attempt=attempt + 1, attempts=runs)
    store.record_state(j.batch_id, task_id, running)
    progress = _Progress(store, j.batch_id, task_id)
    crash: Exception | None = None
    try:
        with metrics.in_flight(), watching(_RequestRetries(store, j.batch_id, task_id, running)):
            # A dry run only reads registries, which the registry engine does for either engine.
            result = runtime.engine("registry" if j.dry_run else j.engine).sync(j, progress, expect=progress.expect)
    except Exception as e:  # a bug must still end the image, not hang the batch
        crash = e
        result = SyncResult(batch_id=j.batch_id, source=j.source, status="failed",
                            error=f"internal error: {type(e).__name__}: {e}", error_code="INTERNAL")
    result = result.model_copy(update={
        "task_id": task_id, "node": s.node, "line": j.line, "engine": j.engine,
        "started_at": started, "duration_s": time.time() - started,
        "attempts": attempt + 1, "first_started_at": first_started_at or started,
        "cleanup_task_id": _chain_cleanup(j, task_id, s.node, result.local_refs) if _left_on_disk(result) else None,
    })
    if result.status == "failed" and result.temporary and crash is None and attempt < s.task_max_retries:
        progress.flush()  # what this run moved stays visible while the task waits (a result carries its own)
        countdown = retry_delay(attempt, s.task_retry_delay)
        store.record_state(j.batch_id, task_id, TaskState(
            phase="retrying", node=s.node, attempt=attempt + 2, attempts=runs, retry_at=time.time() + countdown,
            reason=describe.failure_text(result)))
        try:
            raise self.retry(args=[job], kwargs={"first_started_at": result.first_started_at}, countdown=countdown,
                             max_retries=s.task_max_retries, argsrepr=describe.sync_task_args(j),
                             kwargsrepr="{}")
        except Retry:
            metrics.image_retrying()
            raise
        except Exception as e:  # the retry could not be queued: end the image rather than lose it
            log.warning("retry of %s not queued: %s", j.source, e)
    store.record_result(result)
    metrics.image_finished(result)
    if crash is not None:
        raise crash  # a bug: Celery logs it with its traceback
    if result.status == "failed":
        raise ImageSyncFailed(describe.failure_text(result))
    return describe.flower_result(result)


def _left_on_disk(result: SyncResult) -> bool:
    """Images the docker engine pulled, or blobs the registry engine copied through the node cache.
    A sync that streamed registry to registry leaves nothing: a cleanup after it would only cost a
    second task per image (the periodic cleanup still runs)."""
    return bool(result.local_refs) or result.used_disk


def _chain_cleanup(job: SyncJob, task_id: str, node: str, remove: list[str]) -> str | None:
    """Follow a sync that used the disk with a cleanup on this node's own queue, so it runs where
    the disk filled."""
    try:
        sent = cleanup.apply_async(
            kwargs={"engine": job.engine, "batch_id": job.batch_id, "for_task": task_id, "remove": remove},
            queue=node_queue(node),
            shadow=describe.cleanup_task_name(node, f"after sync {job.source}"),
        )
        return str(sent.id)
    except Exception as e:
        log.warning("cleanup after %s not queued: %s", task_id, e)
        return None


class ExpansionFailed(ImageSyncFailed):
    """A selector line whose repository could not be listed, for a reason a person can act on."""


@app.task(name=EXPAND_TASK, bind=True, base=SyncTask, acks_late=True, max_retries=None)
def expand_repository(self: Task, job: dict[str, Any]) -> dict[str, Any]:
    """List a selector line's repository on this worker and add one sync task per selected tag."""
    j = ExpandJob.model_validate(job)
    s = runtime.settings()
    store = runtime.store()
    task_id = self.request.id or ""
    attempt, runs = self.request.retries, s.task_max_retries + 1
    store.record_state(j.batch_id, task_id, TaskState(phase="running", node=s.node, attempt=attempt + 1,
                                                      attempts=runs))
    try:
        engine = runtime.engine("registry")
        assert isinstance(engine, RegistryEngine)
        publisher = runtime.publisher()
        result = expand(j, task_id, engine, store, lambda tasks: publish(publisher, tasks), page_size=s.tag_page_size)
    except Exception as e:  # a bug must still end the line, not leave the batch expanding forever
        store.record_expansion(ExpandResult(batch_id=j.batch_id, task_id=task_id, source=j.source, line=j.line,
                                            status="failed", error=f"internal error: {type(e).__name__}: {e}",
                                            error_code="INTERNAL", node=s.node))
        raise  # Celery logs it with its traceback
    result = result.model_copy(update={"node": s.node})
    if result.status == "failed" and result.temporary and attempt < s.task_max_retries:
        countdown = retry_delay(attempt, s.task_retry_delay)
        store.record_state(j.batch_id, task_id, TaskState(
            phase="retrying", node=s.node, attempt=attempt + 2, attempts=runs, retry_at=time.time() + countdown,
            reason=result.error))
        try:
            raise self.retry(countdown=countdown, max_retries=s.task_max_retries,
                             argsrepr=describe.expand_task_args(j), kwargsrepr="{}")
        except Retry:
            raise
        except Exception as e:  # the retry could not be queued: end the line rather than lose it
            log.warning("retry of %s not queued: %s", j.source, e)
    store.record_expansion(result)
    if result.status == "failed":
        raise ExpansionFailed(result.error or "listing tags failed")
    return {"summary": describe.expansion_summary(result), "source": result.source, "line": result.line,
            "selected": result.selected, "node": result.node, "batch": result.batch_id}


@app.task(name=CLEANUP_TASK, bind=True, acks_late=True, ignore_result=True, store_errors_even_if_ignored=True)
def cleanup(self: Task, engine: str = "registry", batch_id: str | None = None,
            for_task: str | None = None, remove: list[str] | None = None) -> dict[str, Any]:
    result = runtime.run_cleanup(engine, remove or [], for_task)
    runtime.recorder().cleanup_finished(result)
    if batch_id:
        runtime.store().record_cleanup(batch_id, self.request.id or "", result)
    return describe.flower_cleanup(result)


@app.task(name=SCHEDULE_TASK, bind=True, acks_late=True)
def fire_schedule(self: Task, firing: dict[str, Any]) -> str:
    return fire(runtime.publisher(), runtime.store(), ScheduleFiring.model_validate(firing),
                task_id=self.request.id or "")
