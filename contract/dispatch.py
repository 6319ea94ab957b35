"""Publishing a batch's tasks: by the producer for the list, by expansion tasks for the tags they select.

Task ids are deterministic per batch and job, so publishing twice is harmless.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from config import describe
from config.expansion import ExpandJob
from config.jobs import SyncJob
from contract.broker import EXPAND_TASK, SYNC_QUEUE, SYNC_TASK
from contract.wire import TaskMessage, TaskPublisher

_TASK_NS = uuid.UUID("3b7c1f0e-9a52-4d8e-8f0a-6f1e2c9d4b10")


def task_id_for(batch_id: str, job: SyncJob, retry: int = 0) -> str:
    """Deterministic per (batch, source, destinations, platforms) and ``producer retry`` round:
    enqueueing twice is harmless, and a retry runs under an id of its own."""
    key = "|".join([batch_id, job.source, ",".join(job.destinations), ",".join(job.platforms)])
    return str(uuid.uuid5(_TASK_NS, key + (f"|retry{retry}" if retry else "")))


def expansion_id_for(batch_id: str, job: ExpandJob) -> str:
    key = "|".join(["expand", batch_id, str(job.line), job.source, ",".join(job.destinations)])
    return str(uuid.uuid5(_TASK_NS, key))


def publish(publisher: TaskPublisher, tasks: Sequence[tuple[str, SyncJob]]) -> None:
    publisher.send([TaskMessage(SYNC_TASK, t, [j.model_dump(mode="json")], describe.sync_task_name(j.source),
                                describe.sync_task_args(j)) for t, j in tasks], SYNC_QUEUE)


def publish_expansions(publisher: TaskPublisher, tasks: Sequence[tuple[str, ExpandJob]]) -> None:
    publisher.send([TaskMessage(EXPAND_TASK, t, [j.model_dump(mode="json")], describe.expand_task_name(j.source),
                                describe.expand_task_args(j)) for t, j in tasks], SYNC_QUEUE)
