"""Publishing a batch's tasks: by the producer for the list, by expansion tasks for the tags they select.

Task ids are deterministic per batch and job, so publishing twice is harmless. ``app`` is either
side's Celery application (the contract itself loads no Celery).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from config import describe
from config.expansion import ExpandJob
from config.jobs import SyncJob
from contract.broker import EXPAND_TASK, SYNC_QUEUE, SYNC_TASK

_TASK_NS = uuid.UUID("3b7c1f0e-9a52-4d8e-8f0a-6f1e2c9d4b10")
# Redis commands per pipeline when publishing a batch's tasks (two per task: the message and its event).
PUBLISH_BATCH = 1000


def task_id_for(batch_id: str, job: SyncJob, retry: int = 0) -> str:
    """Deterministic per (batch, source, destinations, platforms) and ``producer retry`` round:
    enqueueing twice is harmless, and a retry runs under an id of its own."""
    key = "|".join([batch_id, job.source, ",".join(job.destinations), ",".join(job.platforms)])
    return str(uuid.uuid5(_TASK_NS, key + (f"|retry{retry}" if retry else "")))


def expansion_id_for(batch_id: str, job: ExpandJob) -> str:
    key = "|".join(["expand", batch_id, str(job.line), job.source, ",".join(job.destinations)])
    return str(uuid.uuid5(_TASK_NS, key))


def publish(app: Any, tasks: Sequence[tuple[str, SyncJob]]) -> None:
    _send(app, SYNC_TASK, [(t, j, describe.sync_task_name(j.source), describe.sync_task_args(j)) for t, j in tasks])


def publish_expansions(app: Any, tasks: Sequence[tuple[str, ExpandJob]]) -> None:
    _send(app, EXPAND_TASK, [(t, j, describe.expand_task_name(j.source), describe.expand_task_args(j))
                             for t, j in tasks])


def _send(app: Any, task: str, tasks: Sequence[tuple[str, BaseModel, str, str]]) -> None:
    """Send the tasks, each followed by the "task-sent" event Flower lists queued tasks from.

    Celery's own sent event names the registered task (``ferry.sync_image``) and may reach Flower
    after the worker's events, renaming the task there; this one carries the name people read.
    """
    with app.producer_or_acquire() as producer, producer.batch(PUBLISH_BATCH):
        # Publishes through the tasks' own producer, as Celery does: no second connection. In a
        # batch, the messages go to Redis in pipelines of PUBLISH_BATCH commands where the broker
        # settings allow it (see producer.enqueue.broker_app), else one by one.
        events = app.events.Dispatcher(producer.connection, enabled=False)
        for task_id, job, name, args in tasks:
            # ignore_result: no one waits on the result backend (the batch store holds outcomes),
            # so the sender subscribes to no result channel per task.
            app.send_task(task, args=[job.model_dump(mode="json")], task_id=task_id, queue=SYNC_QUEUE,
                          producer=producer, argsrepr=args, shadow=name, ignore_result=True)
            events.publish("task-sent", {
                "uuid": task_id, "root_id": task_id, "parent_id": None, "name": name, "args": args,
                "kwargs": "{}", "retries": 0, "eta": None, "expires": None, "queue": SYNC_QUEUE,
                "exchange": "", "routing_key": SYNC_QUEUE}, producer)
