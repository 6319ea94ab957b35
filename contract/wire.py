"""Celery task messages as kombu's Redis transport keeps them, written without loading Celery.

A task message is Celery's protocol 2 (headers, then a body of ``[args, kwargs, embed]``) in
kombu's Redis envelope: JSON with the body base64-encoded, pushed onto the queue's list. Events
go out on Redis pub/sub, on kombu's fanout channel ``/<db>.celeryev/<routing key>``. Workers read
both with Celery as usual; writing them here keeps Celery, kombu and their imports out of the
producer, whose start-up is most of a short run.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

EVENT_EXCHANGE = "celeryev"
# Redis commands per pipeline: two per task (its message and its sent event).
PIPELINE = 1000
_NO_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


@dataclass(frozen=True)
class TaskMessage:
    """One task to send: Celery's registered ``task`` name under ``task_id``, shown as ``shadow``
    with ``argsrepr`` wherever tasks are listed (Flower, worker logs)."""

    task: str
    task_id: str
    args: list[Any]
    shadow: str
    argsrepr: str


def _utcoffset() -> float:
    """Hours west of UTC, as Celery's events carry it."""
    return (time.altzone if time.localtime().tm_isdst else time.timezone) / 3600


def _envelope(body: Any, headers: dict[str, Any], exchange: str, routing_key: str, *, persistent: bool,
              properties: dict[str, Any] | None = None) -> str:
    return json.dumps({
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            **(properties or {}),
            "delivery_mode": 2 if persistent else 1,
            "delivery_info": {"exchange": exchange, "routing_key": routing_key},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    })


class TaskPublisher:
    """Sends task messages, each followed by the ``task-sent`` event Flower lists queued tasks from.

    ``r`` is a client of the broker's Redis (its database number names the event channel).
    Messages go in pipelines of ``PIPELINE`` commands; a task sent twice is harmless, since its id
    is fixed and its first success stands.
    """

    def __init__(self, r: redis.Redis[bytes]) -> None:
        self.r = r
        self.origin = f"gen{os.getpid()}@{socket.gethostname()}"
        self._events = f"/{r.connection_pool.connection_kwargs.get('db', 0)}.{EVENT_EXCHANGE}/"
        self._clock = itertools.count(1)  # Lamport clock of the events sent; next() is atomic

    def _task(self, m: TaskMessage, queue: str) -> str:
        headers: dict[str, Any] = {
            "lang": "py", "task": m.task, "id": m.task_id, "shadow": m.shadow, "eta": None, "expires": None,
            "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": m.task_id,
            "parent_id": None, "argsrepr": m.argsrepr, "kwargsrepr": "{}", "origin": self.origin,
            # No one waits on the result backend (the batch store holds outcomes).
            "ignore_result": True, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
        }
        return _envelope([m.args, {}, _NO_EMBED], headers, "", queue, persistent=True,
                         properties={"correlation_id": m.task_id, "reply_to": ""})

    def _sent_event(self, m: TaskMessage, queue: str) -> str:
        """Celery's own sent event would name the registered task and may reach Flower after the
        worker's events, renaming the task there; this one carries the name people read."""
        event = {
            "hostname": self.origin, "utcoffset": _utcoffset(), "pid": os.getpid(), "clock": next(self._clock),
            "uuid": m.task_id, "root_id": m.task_id, "parent_id": None, "name": m.shadow, "args": m.argsrepr,
            "kwargs": "{}", "retries": 0, "eta": None, "expires": None, "queue": queue, "exchange": "",
            "routing_key": queue, "timestamp": time.time(), "type": "task-sent",
        }
        return _envelope(event, {"hostname": self.origin}, EVENT_EXCHANGE, "task.sent", persistent=False)

    def send(self, messages: Sequence[TaskMessage], queue: str) -> None:
        with self.r.pipeline(transaction=False) as p:
            for i, m in enumerate(messages, 1):
                p.lpush(queue, self._task(m, queue))
                p.publish(self._events + "task.sent", self._sent_event(m, queue))
                if 2 * i % PIPELINE == 0:
                    p.execute()
            p.execute()
