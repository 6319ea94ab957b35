"""Turn a validated list into one Celery task per image, recorded as a batch."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

from celery import Celery

from config import describe
from config.jobs import BatchMeta, SyncJob
from config.settings import EngineName, FerrySettings
from contract.batches import BatchStore
from contract.broker import SYNC_QUEUE, SYNC_TASK, celery_config
from producer.listfile import parse_list
from producer.mapping import Mapped, Target, map_destinations

_TASK_NS = uuid.UUID("3b7c1f0e-9a52-4d8e-8f0a-6f1e2c9d4b10")


def new_batch_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def task_id_for(batch_id: str, job: SyncJob, retry: int = 0) -> str:
    """Deterministic per (batch, source, destinations, platforms) and ``producer retry`` round:
    enqueueing twice is harmless, and a retry runs under an id of its own."""
    key = "|".join([batch_id, job.source, ",".join(job.destinations), ",".join(job.platforms)])
    return str(uuid.uuid5(_TASK_NS, key + (f"|retry{retry}" if retry else "")))


def build_jobs(batch_id: str, mapped: Sequence[Mapped], engine: EngineName, *, referrers: bool = True) -> list[SyncJob]:
    """One job per distinct copy: lines that spell the same copy differently share one task id,
    and two jobs under one id would be counted twice in the report."""
    jobs: dict[tuple[str, tuple[str, ...], tuple[str, ...]], SyncJob] = {}
    for m in mapped:
        job = SyncJob(
            batch_id=batch_id,
            source=str(m.entry.source),
            destinations=[str(d) for d in m.destinations],
            platforms=[str(p) for p in m.entry.platforms],
            engine=engine,
            line=m.entry.line,
            referrers=referrers and m.entry.referrers,
        )
        jobs.setdefault((job.source, tuple(job.destinations), tuple(job.platforms)), job)
    return list(jobs.values())


def broker_app(settings: FerrySettings) -> Celery:
    """A Celery app that only sends: the workers define the tasks, the contract names them."""
    app = Celery("ferry")
    app.conf.update(celery_config(settings))
    return app


def plan_batch(batch_id: str, data: bytes, targets: Sequence[str], *, flatten: bool, engine: EngineName,
               referrers: bool = True) -> tuple[list[SyncJob], list[str]]:
    """A list's bytes to the jobs of one batch, and the list's warnings: the one path from a list
    to a batch, for ``producer enqueue`` and for scheduled runs alike. Raises ListFileError naming
    every bad line, or InvalidReference for a bad target."""
    parsed = parse_list(data)
    parsed_targets = [Target.parse(t) for t in targets]
    mapped = map_destinations(parsed.entries, parsed_targets, flatten=flatten)
    return build_jobs(batch_id, mapped, engine, referrers=referrers), parsed.warnings


def enqueue(app: Celery, store: BatchStore, batch_id: str, list_file: str, targets: list[str],
            jobs: list[SyncJob]) -> BatchMeta:
    """Record the batch, then publish every task over one broker connection."""
    task_ids = [task_id_for(batch_id, j) for j in jobs]
    meta = BatchMeta(batch_id=batch_id, created_at=time.time(), list_file=list_file, targets=targets,
                     jobs=jobs, task_ids=task_ids)
    store.create(meta)
    publish(app, list(zip(task_ids, jobs, strict=True)))
    return meta


def publish(app: Celery, tasks: list[tuple[str, SyncJob]]) -> None:
    """Send the tasks, each followed by the "task-sent" event Flower lists queued tasks from.

    Celery's own sent event names the registered task (``ferry.sync_image``) and may reach Flower
    after the worker's events, renaming the task there; this one carries the name people read.
    """
    with app.producer_or_acquire() as producer:
        # Publishes through the tasks' own producer, as Celery does: no second connection.
        events = app.events.Dispatcher(producer.connection, enabled=False)
        for task_id, job in tasks:
            name, args = describe.sync_task_name(job.source), describe.sync_task_args(job)
            app.send_task(SYNC_TASK, args=[job.model_dump(mode="json")], task_id=task_id, queue=SYNC_QUEUE,
                          producer=producer, argsrepr=args, shadow=name)
            events.publish("task-sent", {
                "uuid": task_id, "root_id": task_id, "parent_id": None, "name": name, "args": args,
                "kwargs": "{}", "retries": 0, "eta": None, "expires": None, "queue": SYNC_QUEUE,
                "exchange": "", "routing_key": SYNC_QUEUE}, producer)
