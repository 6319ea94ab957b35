"""One run of a schedule, on a worker: a batch named after the schedule, enqueued like any other.

Beat may send a run more than once (a beat that died between claiming a run and sending it is
made good by another); the first message to claim the run here fires it, the others do nothing.
A run whose schedule's previous batch is still going is skipped, and says so.

Its Redis keys are listed in contract/keys.py.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Literal

from config.reference import InvalidReference
from config.schedules import ScheduleFiring
from contract import keys
from contract.batches import BatchStore
from contract.wire import TaskPublisher
from producer.enqueue import enqueue, plan_batch
from producer.listfile import ListFileError

log = logging.getLogger("ferry.schedules")

HISTORY = 100

Outcome = Literal["fired", "skipped", "duplicate", "invalid"]


def when(run_at: float) -> str:
    return datetime.fromtimestamp(run_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def fire(publisher: TaskPublisher, store: BatchStore, firing: ScheduleFiring, *, task_id: str) -> Outcome:
    """Enqueue ``firing``'s batch unless its run already fired or the previous batch still runs."""
    r, key, name = store.r, keys.schedule(firing.name), firing.name
    claim = keys.schedule_run(name, firing.run_at)
    if not r.set(claim, task_id, nx=True, ex=store.ttl):
        holder = r.get(claim)
        if holder is None or holder.decode() != task_id:  # a redelivery of this message goes on
            log.info("schedule %s: the run at %s was already fired; this copy does nothing", name, when(firing.run_at))
            return "duplicate"
    previous = r.hget(key, "batch")
    if previous is not None:
        snap = store.snapshot(previous.decode())
        if snap is not None and not snap.done:
            running = previous.decode()
            log.warning("schedule %s: skipping the run at %s: batch %s is still running (%d of %d images done)",
                        name, when(firing.run_at), running, len(snap.results), len(snap.meta.task_ids))
            _record(store, name, firing.run_at, f"skipped ({running} still running)",
                    skipped_at=firing.run_at, increment="skipped")
            return "skipped"
    batch_id = firing.batch_id
    try:
        jobs, expansions, warnings = plan_batch(batch_id, firing.data.encode(), firing.targets,
                                                flatten=firing.flatten, engine=firing.engine,
                                                referrers=firing.referrers, list_file=firing.list_file)
    except (ListFileError, InvalidReference) as e:
        reason = f"{firing.list_file}: {e}".replace("\n", "; ")
        log.error("schedule %s: the run at %s enqueued nothing: %s", name, when(firing.run_at), reason)
        _record(store, name, firing.run_at, f"invalid: {reason}", error=reason)
        return "invalid"
    for w in warnings:
        log.warning("schedule %s: %s", name, w)
    enqueue(publisher, store, batch_id, firing.list_file, firing.targets, jobs, expansions)
    log.info("schedule %s: the run at %s enqueued batch %s (%d images)", name, when(firing.run_at), batch_id, len(jobs))
    _record(store, name, firing.run_at, f"fired {batch_id}", batch=batch_id, fired_at=time.time(), increment="fired")
    return "fired"


def _record(store: BatchStore, name: str, run_at: float, event: str, *, increment: str | None = None,
            **fields: str | int | float) -> None:
    key, history = keys.schedule(name), keys.schedule_history(name)
    with store.r.pipeline() as p:
        if fields:
            mapping: dict[str | bytes, bytes | float | int | str] = {k: v for k, v in fields.items()}
            p.hset(key, mapping=mapping)
        if increment:
            p.hincrby(key, increment, 1)
        p.lpush(history, f"{run_at:.0f} {event}")
        p.ltrim(history, 0, HISTORY - 1)
        p.execute()
