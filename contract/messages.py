"""Which task messages the broker holds: queued, or delivered and not yet acknowledged.

kombu's Redis transport keeps a queue as one list per priority step and a delivered message in
the ``unacked`` hash until it is acknowledged (a worker that dies leaves it there, to be restored
after the visibility timeout). A message in neither is lost: popped by a worker whose Redis went
away before the message was recorded as delivered, the one window in which the transport drops a
message. A task with no message, no state and no result will never run, so the producer sends it
again (task ids are fixed and the first success stands: a second copy is harmless).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import redis

UNACKED_KEY = "unacked"
# kombu's Redis transport: a list per priority step, named queue + separator + step (0: the queue).
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
_CHUNK = 1000


def _task_id(raw: bytes) -> str | None:
    try:
        doc: Any = json.loads(raw)
    except ValueError:
        return None
    if isinstance(doc, list):  # an unacked entry: [message, exchange, routing key]
        doc = doc[0] if doc else None
    if not isinstance(doc, dict):
        return None
    task_id = (doc.get("headers") or {}).get("id")
    return str(task_id) if task_id else None


def held_task_ids(r: redis.Redis[bytes], queues: Iterable[str]) -> set[str]:
    """Ids of the tasks whose messages wait in ``queues`` or are delivered and unacknowledged."""
    held: set[str] = set()
    for queue in queues:
        for step in PRIORITY_STEPS:
            key = queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}"
            start = 0
            while chunk := r.lrange(key, start, start + _CHUNK - 1):
                held.update(t for raw in chunk if (t := _task_id(raw)) is not None)
                start += _CHUNK
    for _, raw in r.hscan_iter(UNACKED_KEY, count=_CHUNK):
        if (t := _task_id(raw)) is not None:
            held.add(t)
    return held


class LostMessages:
    """Finds tasks whose messages the broker lost: absent from every queue and from the unacked
    hash at two looks in a row (a message is briefly in neither while a worker takes it)."""

    def __init__(self, r: redis.Redis[bytes], queues: Iterable[str]) -> None:
        self.r, self.queues = r, tuple(queues)
        self._suspects: set[str] = set()

    def look(self, waiting: set[str]) -> set[str]:
        """Of ``waiting`` (tasks with neither state nor result), those lost at this look and the last."""
        absent = waiting - held_task_ids(self.r, self.queues) if waiting else set()
        lost, self._suspects = absent & self._suspects, absent
        return lost
