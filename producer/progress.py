"""Live progress of a batch: images done/total, bytes moved of bytes expected, rate, ETA, and
failures and retries as they happen."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import redis
from rich.console import Console
from rich.markup import escape

from config import describe
from config.jobs import BatchMeta, SyncResult
from contract.batches import BatchSnapshot, BatchStore, Tally
from contract.messages import LostMessages
from producer.report import expected_cleanups

T = TypeVar("T")
P = ParamSpec("P")

# Rate over the last few seconds: steady enough to read, quick to follow a change.
RATE_WINDOW = 5.0
# With no result for this long, look for tasks whose messages the broker lost (twice, this far apart).
LOST_LOOK_AFTER = 10.0


@dataclass(frozen=True)
class Volume:
    """Bytes of the watched images: moved so far, and in all (None until a manifest is known)."""

    moved: int
    total: int | None
    # Some images are not planned yet: their share of ``total`` is the planned images' average.
    estimated: bool

    def text(self) -> str:
        moved = describe.human_bytes(self.moved)
        if self.total is None:
            return moved
        return f"{moved} / {'~' if self.estimated else ''}{describe.human_bytes(self.total)}"


class Finished:
    """The watched tasks' results, with their bytes summed as they arrive: the live view's cost
    per poll follows the tasks in flight, not the batch's size."""

    def __init__(self) -> None:
        self.results: dict[str, SyncResult] = {}
        self.bytes = 0
        self.failed = 0

    def add(self, task_id: str, result: SyncResult | None) -> None:
        """Record (or replace) a task's result; None forgets it (a retry round replaced it)."""
        old = self.results.pop(task_id, None)
        if old is not None:
            self.bytes -= old.bytes_transferred
            self.failed -= old.status == "failed"
        if result is not None:
            self.results[task_id] = result
            self.bytes += result.bytes_transferred
            self.failed += result.status == "failed"

    def volume(self, watched: int, watching: Collection[str], tally: Tally) -> Volume:
        """Bytes moved and in all; a task without a result counts what the tally says it moved
        (and expects, once planned)."""
        moved, known, planned = self.bytes, self.bytes, 0
        for t, n in tally.moved.items():
            if t in watching and t not in self.results:
                moved += n
        for t, n in tally.expected.items():
            if t in watching and t not in self.results:
                known += max(n, tally.moved.get(t, 0))
                planned += 1
        known_n = len(self.results) + planned
        unknown = watched - known_n
        if not known:  # nothing planned that moves bytes yet: no byte total to speak of
            return Volume(moved, None, False)
        total = known + round(known / known_n * unknown)
        return Volume(moved, max(total, moved), unknown > 0)


class Meter:
    """Rate over a sliding window, and the time left: by bytes once a byte total is known,
    else by images."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.samples: deque[tuple[float, int]] = deque()

    def rate(self, now: float, moved: int) -> float:
        self.samples.append((now, moved))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW:
            self.samples.popleft()
        t0, m0 = self.samples[0]
        return (moved - m0) / (now - t0) if now - t0 >= 0.5 else 0.0

    def eta(self, now: float, vol: Volume, rate: float, done: int, total: int) -> float | None:
        if done >= total:
            return 0.0
        if vol.total is not None and rate > 0:
            return max(0.0, vol.total - vol.moved) / rate
        if done:
            return (now - self.started) / done * (total - done)
        return None


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def wait_for_batch(store: BatchStore, meta: BatchMeta, console: Console, *, task_ids: list[str] | None = None,
                   poll: float = 0.02, timeout: float | None = None, lost: LostMessages | None = None,
                   resend: Callable[[list[str]], None] | None = None) -> BatchSnapshot:
    """Poll until every watched task (default: the batch's, which grows as selector lines are
    expanded) has a final result, or ``timeout`` passes. With ``lost`` and ``resend``, a task
    whose message the broker lost is sent again once the batch has stalled."""
    whole = task_ids is None
    watch = list(task_ids or meta.task_ids)
    lines = {t: j.line for t, j in zip(meta.task_ids, meta.jobs, strict=True)}
    sources = {t: j.source for t, j in zip(meta.task_ids, meta.jobs, strict=True)}
    started = time.monotonic()
    meter = Meter(started)
    told: set[tuple[str, int]] = set()  # failures (attempt 0) and retries already printed
    failed_verb = "would fail" if meta.dry_run else "failed"
    if whole and meta.expansion_ids:
        n = len(meta.expansion_ids)
        console.print(f"expanding {n} {'repository' if n == 1 else 'repositories'}…", highlight=False)
    with _bar(console) as draw:
        snap: BatchSnapshot | None = None
        grown: tuple[int, int] | None = None
        done = Finished()
        watching = set(watch)
        offset = 0  # position in the batch's done list: only results written since are read
        progressed = looked = time.monotonic()
        while True:
            tally = _unless_broker_down(store.tally, meta.batch_id)
            if tally is not None and whole and (tally.expanded, tally.added) != grown:
                # The batch grows (rare: once per expansion): read it whole, and watch what it added.
                snap = _unless_broker_down(store.snapshot, meta.batch_id, meta)
                if snap is not None:
                    grown = (tally.expanded, tally.added)
                    _grow(console, snap, watch, lines, sources, told)
                    watching.update(watch)
            if tally is not None and tally.done > offset:
                arrived = _unless_broker_down(store.results_since, meta.batch_id, offset)
                if arrived is not None:
                    fresh, offset = arrived
                    progressed = time.monotonic()
                    for t, r in fresh.items():
                        if t in watching:
                            done.add(t, r)
                            if r is not None and r.status == "failed" and (t, 0) not in told:
                                told.add((t, 0))
                                _say(console, "red", describe.failure_line(r, failed_verb), failed_verb)
            if tally is not None:
                now = time.monotonic()
                retrying = {t: s for t, s in tally.states.items() if t in lines and t not in done.results
                            and s.retrying}
                for t, s in retrying.items():
                    # Once per run: the first request retried in it, then the wait for the next run.
                    key = (t, s.attempt if s.phase == "retrying" else -s.attempt)
                    if key not in told:
                        told.add(key)
                        text = describe.retry_line(lines[t], sources[t], s, time.time())
                        _say(console, "yellow", text, "retrying")
                vol = done.volume(len(watch), watching, tally)
                rate = meter.rate(now, vol.moved)
                finished_n, failed = len(done.results), done.failed
                # A batch whose selector lines are still being listed is not finished, even at 0/0.
                expanding = whole and tally.expanded < len(meta.expansion_ids)
                finished = finished_n == len(watch) and not expanding
                # While running, the recent rate; at the end, the average (the recent one has decayed).
                shown = describe.human_rate(vol.moved, now - started) if finished else \
                    f"{describe.human_bytes(rate)}/s"
                figures = [f"{finished_n}/{len(watch)}", vol.text(), shown]
                figures += [f"[red]{failed} failed[/]"] if failed else []
                figures += [f"[yellow]{len(retrying)} retrying[/]"] if retrying else []
                figures += [_clock(now - started), f"eta {_clock(meter.eta(now, vol, rate, finished_n, len(watch)))}"]
                share = vol.moved / vol.total if vol.total else finished_n / max(1, len(watch))
                draw(completed=1.0 if finished else min(1.0, share), figures="  ".join(figures))
                if not finished and lost is not None and resend is not None \
                        and now - max(progressed, looked) >= LOST_LOOK_AFTER:
                    looked = now
                    waiting = {t for t in watch if t not in done.results and t not in tally.states}
                    again = _unless_broker_down(lost.look, waiting) or set()
                    if again:
                        resend(sorted(again))
                        for t in sorted(again, key=lambda t: lines[t]):
                            _say(console, "yellow", f"re-sent line {lines[t]}: {sources[t]}: its task message "
                                 "was lost by the broker", "re-sent")
                if finished:
                    # Read once, at the end, for the summary.
                    final = _unless_broker_down(store.snapshot, meta.batch_id, meta)
                    if final is not None:
                        return final
            if timeout is not None and time.monotonic() - started > timeout:
                last = _unless_broker_down(store.snapshot, meta.batch_id, meta) or snap
                if last is None:
                    raise TimeoutError(f"batch {meta.batch_id}: Redis did not answer")
                return last
            time.sleep(poll)


@contextmanager
def _bar(console: Console) -> Iterator[Callable[..., None]]:
    """Draws the live bar on a terminal; elsewhere draws nothing (nor loads rich's progress module,
    a noticeable part of a short command's start-up)."""
    if not console.is_terminal:
        yield lambda **fields: None
        return
    from rich.progress import BarColumn, Progress, TextColumn

    columns = (TextColumn("[bold]images"), BarColumn(), TextColumn("{task.fields[figures]}"))
    with Progress(*columns, console=console, transient=False, refresh_per_second=4) as bar:
        task = bar.add_task("images", total=1.0, figures="")
        yield lambda **fields: bar.update(task, **fields)


def _grow(console: Console, snap: BatchSnapshot, watch: list[str], lines: dict[str, int], sources: dict[str, str],
          told: set[tuple[str, int]]) -> None:
    """Watch the jobs expansions added, and say what each expansion found, once."""
    for t, j in snap.jobs:
        if t not in lines:
            watch.append(t)
            lines[t], sources[t] = j.line, j.source
    for eid, e in snap.expansions.items():
        if (eid, 0) in told:
            continue
        told.add((eid, 0))
        if e.status == "failed":
            _say(console, "red", describe.expansion_line(e), "failed")
        else:
            more = f", {snap.expanding} repositories still expanding" if snap.expanding else ""
            console.print(escape(f"{describe.expansion_line(e)}; batch now {len(snap.jobs)} image(s){more}"),
                          highlight=False, soft_wrap=True)


def _say(console: Console, colour: str, text: str, verb: str) -> None:
    rest = text.removeprefix(verb)
    console.print(f"[{colour}]{verb}[/]{escape(rest)}", highlight=False, soft_wrap=True)


def _unless_broker_down(read: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T | None:
    """A broker restart must not end the wait: None while Redis does not answer, and the wait polls
    again. Anything else is a bug to report, not a reason to wait forever."""
    try:
        return read(*args, **kwargs)
    except redis.RedisError:
        return None


def wait_for_cleanups(store: BatchStore, snap: BatchSnapshot, console: Console, *, poll: float = 0.05,
                      timeout: float | None = None) -> BatchSnapshot:
    """Wait until every cleanup named by the batch's results has recorded what it freed.

    Driven by what the batch records, not by a count of syncs: a sync that chains no cleanup
    names none, and is not waited for."""
    started = time.monotonic()
    expected = expected_cleanups(snap)
    missing = expected - snap.cleanups.keys()
    if missing:
        console.print(f"waiting for {len(missing)} cleanup(s) to finish on this node", soft_wrap=True)
    while missing:
        if timeout is not None and time.monotonic() - started > timeout:
            console.print(f"[yellow]warning:[/] {len(missing)} cleanup(s) did not finish in time", soft_wrap=True)
            break
        time.sleep(poll)
        fresh = _unless_broker_down(store.snapshot, snap.meta.batch_id, snap.meta)
        if fresh is not None:
            snap = fresh
            missing = expected - snap.cleanups.keys()
    return snap
