"""Live progress of a batch: images done/total, bytes, rate, ETA, failures as they happen."""

from __future__ import annotations

import time

import redis
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from config.jobs import BatchMeta
from producer.report import human_bytes
from workers.batches import BatchSnapshot, BatchStore


def wait_for_batch(store: BatchStore, meta: BatchMeta, console: Console, *, poll: float = 0.05,
                   timeout: float | None = None) -> BatchSnapshot:
    """Poll the batch until every task has a final result (or ``timeout`` passes)."""
    started = time.monotonic()
    seen_failures: set[str] = set()
    last_bytes, last_t, rate = 0, started, 0.0
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[bytes]}"), TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[failed]}"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False, refresh_per_second=4,
                  disable=not console.is_terminal) as bar:
        task = bar.add_task("images", total=len(meta.task_ids), bytes="0 B", rate="", failed="")
        snap: BatchSnapshot | None = None
        seen_count = -1
        while True:
            tally = _tally(store, meta)
            if tally is not None:
                count, moved = tally
                if count != seen_count:  # read every result only when a new one arrived
                    snap = _snapshot(store, meta)
                    seen_count = count if snap is not None else -1
                now = time.monotonic()
                if now - last_t >= 1.0:
                    rate = (moved - last_bytes) / (now - last_t)
                    last_bytes, last_t = moved, now
                failed = [r for r in snap.results.values() if r.status == "failed"] if snap else []
                for r in failed:
                    if r.task_id not in seen_failures:
                        seen_failures.add(r.task_id)
                        console.print(f"[red]failed[/] line {r.line}: {escape(r.source)}: {escape(str(r.error))}",
                                      highlight=False, soft_wrap=True)
                bar.update(task, completed=count, bytes=human_bytes(moved),
                           rate=f"{human_bytes(rate)}/s", failed=f"{len(failed)} failed" if failed else "")
                if snap is not None and snap.done:
                    return snap
            if timeout is not None and time.monotonic() - started > timeout:
                if snap is None:
                    raise TimeoutError(f"batch {meta.batch_id}: Redis did not answer")
                return snap
            time.sleep(poll)


def _tally(store: BatchStore, meta: BatchMeta) -> tuple[int, int] | None:
    try:
        return store.tally(meta.batch_id)
    except redis.RedisError:
        return None


def _snapshot(store: BatchStore, meta: BatchMeta) -> BatchSnapshot | None:
    """A broker restart must not end the wait: keep polling until Redis answers again."""
    try:
        return store.snapshot(meta.batch_id, meta)
    except redis.RedisError:  # anything else is a bug to report, not a reason to wait forever
        return None
