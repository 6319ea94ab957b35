"""Summaries of a batch: counts, failures with reasons, bytes, time and rate — as a table or JSON.

Two views: what one command watched (``enqueue --wait``, ``retry --wait``: only that run's own
images, bytes and seconds), and the whole batch (``report``: every image, with the time work was
under way apart from the wall time since it was enqueued).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from config import describe
from config.expansion import ExpandResult
from config.jobs import SyncResult
from contract.batches import BatchSnapshot

OK, FAILED = 0, 1


@dataclass
class Summary:
    total: int
    synced: int = 0
    up_to_date: int = 0
    failed: int = 0
    pending: int = 0
    bytes: int = 0
    # Seconds of work the figures cover: the command's own wait, or the batch's active time.
    elapsed: float = 0.0
    # The whole batch only: since it was enqueued, idle gaps (before a retry) included.
    wall: float | None = None
    failures: list[SyncResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    # Cleanups the results name (each sync's chained one), and how many of them have reported.
    cleanups_expected: int = 0
    cleanups_done: int = 0
    would_copy: int = 0
    # Selector lines (whole batch only): what each found, which could not be listed, what pruning did.
    expansions: list[ExpandResult] = field(default_factory=list)
    expansion_failures: list[ExpandResult] = field(default_factory=list)
    pruning: list[tuple[bool, str]] = field(default_factory=list)
    # Selector lines whose tags are still being listed: their images are not counted yet.
    expanding: int = 0

    @property
    def prune_failures(self) -> int:
        return sum(problem for problem, _ in self.pruning)

    @property
    def exit_code(self) -> int:
        clean = self.failed == 0 and self.pending == 0 and self.expanding == 0 and self.prune_failures == 0
        return OK if clean else FAILED

    @property
    def rate(self) -> float:
        return self.bytes / self.elapsed if self.elapsed > 0 else 0.0


def expected_cleanups(snap: BatchSnapshot, task_ids: list[str] | None = None) -> set[str]:
    """The cleanup task ids the results of ``task_ids`` (default: the batch's) name: what the batch
    itself says will follow."""
    ids = snap.meta.task_ids if task_ids is None else task_ids
    return {c for t in ids if t in snap.results and (c := snap.results[t].cleanup_task_id)}


def summarize(snap: BatchSnapshot, task_ids: list[str] | None = None, elapsed: float | None = None) -> Summary:
    """The watched tasks (``task_ids``, over ``elapsed`` seconds), or with neither the whole batch."""
    whole = task_ids is None and elapsed is None
    ids = [t for t, _ in snap.jobs] if task_ids is None else task_ids
    s = Summary(total=len(ids))
    for tid in ids:
        r = snap.results.get(tid)
        if r is None:
            s.pending += 1
            continue
        s.bytes += r.bytes_transferred
        if r.status == "synced":
            s.synced += 1
        elif r.status == "up_to_date":
            s.up_to_date += 1
        elif r.status == "would_copy":
            s.would_copy += 1
        else:
            s.failed += 1
            s.failures.append(r)
        s.warnings += [f"{r.source}: {w}" for w in r.warnings]
    s.freed_bytes = sum(c.freed_bytes for c in snap.cleanups.values())
    expected = expected_cleanups(snap, ids)
    s.cleanups_expected, s.cleanups_done = len(expected), len(expected & snap.cleanups.keys())
    if task_ids is None:
        _selector_lines(snap, s)
    if whole:
        done = [*snap.results.values(), *snap.history.values()]
        s.bytes += sum(r.bytes_transferred for r in snap.history.values())
        s.elapsed = active_seconds(done)
        s.wall = max((r.ended_at for r in done), default=snap.meta.created_at) - snap.meta.created_at
    else:
        s.elapsed = elapsed or 0.0
    return s


def _selector_lines(snap: BatchSnapshot, s: Summary) -> None:
    s.expanding = snap.expanding
    for eid in snap.meta.expansion_ids:
        e = snap.expansions.get(eid)
        if e is None:
            continue
        if e.status == "failed":
            s.failed += 1
            s.expansion_failures.append(e)
            continue
        s.expansions.append(e)
        for p in e.pruned:
            s.pruning += describe.prune_lines(p, e.line, dry_run=snap.meta.dry_run)


def active_seconds(results: list[SyncResult]) -> float:
    """How long some image of these was being worked on: the union of their spans."""
    spans = sorted((r.active_since, r.ended_at) for r in results)
    total, cur_start, cur_end = 0.0, None, 0.0
    for start, end in spans:
        if cur_start is None or start > cur_end:
            total += (cur_end - cur_start) if cur_start is not None else 0.0
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    return total + ((cur_end - cur_start) if cur_start is not None else 0.0)


def retried(snap: BatchSnapshot, task_id: str) -> int:
    """How often ``producer retry`` sent this line again."""
    return len(snap.meta.earlier_tasks(task_id))


def render(console: Console, snap: BatchSnapshot, summary: Summary, *, details: bool = False,
           title: str | None = None, failures_shown: bool = False) -> None:
    """The summary table; ``failures_shown``: each failure's reason was already printed as it
    happened (``--wait``), so the table's count stands alone."""
    console.print(f"[bold]{escape(title or f'batch {snap.meta.batch_id}')}[/]", highlight=False, soft_wrap=True)
    table = Table(show_header=True, header_style="bold")
    table.add_column("result")
    table.add_column("images", justify="right")
    dry = snap.meta.dry_run
    table.add_row("[green]would copy[/]" if dry else "[green]synced[/]", str(summary.would_copy if dry else
                                                                         summary.synced))
    table.add_row("[cyan]already up to date[/]", str(summary.up_to_date))
    table.add_row("[red]would fail[/]" if dry else "[red]failed[/]", str(summary.failed))
    if summary.pending:
        table.add_row("[yellow]not finished[/]", str(summary.pending))
    if summary.expanding:
        table.add_row("[yellow]selector lines still listing tags[/]", str(summary.expanding))
    table.add_row("bytes to copy" if dry else "bytes transferred", describe.human_bytes(summary.bytes))
    if summary.wall is None:
        table.add_row("time", describe.human_seconds(summary.elapsed))
    else:
        table.add_row("active time", describe.human_seconds(summary.elapsed))
        table.add_row("wall time", describe.human_seconds(summary.wall))
    if not dry:  # a plan moves nothing
        table.add_row("average rate", describe.human_rate(summary.bytes, summary.elapsed))
    all_in = summary.cleanups_expected > 0 and summary.cleanups_done >= summary.cleanups_expected
    if summary.freed_bytes or all_in:  # nothing freed yet by cleanups still to come: no row
        so_far = "" if all_in or not summary.cleanups_expected else \
            f" ({summary.cleanups_done} of {summary.cleanups_expected} cleanups so far)"
        table.add_row("freed by cleanup", describe.human_bytes(summary.freed_bytes) + so_far)
    console.print(table)
    for e in summary.expansions:
        _say(console, "", describe.expansion_line(e), "expanded")
    if details:
        console.print(_per_image(snap))
    elif dry:
        # One line per image, so a plan reads (and greps) whole at any width.
        for tid, job in sorted(snap.jobs, key=lambda tj: tj[1].line):
            r = snap.results.get(tid)
            if r is not None:
                console.print(escape(describe.plan_line(r, job.destinations)), highlight=False, soft_wrap=True)
    for problem, text in summary.pruning:
        _say(console, "red" if problem else "magenta", text, "prune")
    for r in [] if failures_shown else summary.failures:
        verb = "would fail" if dry else "failed"
        _say(console, "red", describe.failure_line(r, verb), verb, shout=True)
    for e in [] if failures_shown else summary.expansion_failures:
        _say(console, "red", describe.expansion_line(e), "failed", shout=True)
    for w in summary.warnings:
        console.print(f"[yellow]warning[/] {escape(w)}", highlight=False, soft_wrap=True)


def _say(console: Console, colour: str, text: str, verb: str, *, shout: bool = False) -> None:
    """``text`` starts with ``verb``: coloured (and upper-cased with ``shout``), the rest escaped."""
    rest = text.removeprefix(verb)
    head = verb.upper() if shout else verb
    console.print(f"[{colour}]{head}[/]{escape(rest)}" if colour else escape(text), highlight=False,
                  soft_wrap=True)


def _per_image(snap: BatchSnapshot) -> Table:
    per = Table(show_header=True, header_style="bold")
    for col in ("line", "source", "status", "destinations", "node", "bytes", "retried"):
        # References are long and have no spaces: fold them rather than cut them.
        per.add_column(col, justify="right" if col in ("line", "bytes") else "left", overflow="fold")
    for tid, job in snap.jobs:
        r = snap.results.get(tid)
        if r is not None:
            status = describe.result_summary(r) if r.status == "would_copy" else r.status.replace("_", " ")
        elif (state := snap.states.get(tid)) is not None:
            status = f"{state.phase} ({state.attempt}/{state.attempts})" if state.attempt > 1 else state.phase
        else:
            status = "queued"
        again = retried(snap, tid)
        per.add_row(str(job.line), escape(job.source), escape(status), escape("\n".join(job.destinations)),
                    escape(r.node) if r else "", describe.human_bytes(r.bytes_transferred) if r else "",
                    describe.times(again) if again else "")
    return per


def as_json(snap: BatchSnapshot, summary: Summary) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "batch_id": snap.meta.batch_id,
        "summary": {
            "total": summary.total, "synced": summary.synced, "up_to_date": summary.up_to_date,
            "failed": summary.failed, "pending": summary.pending, "bytes": summary.bytes,
            "elapsed_s": round(summary.elapsed, 3), "rate_bytes_per_s": round(summary.rate),
            "freed_bytes": summary.freed_bytes,
            "cleanups_done": summary.cleanups_done, "cleanups_expected": summary.cleanups_expected,
            "would_copy": summary.would_copy, "dry_run": snap.meta.dry_run,
        },
        "images": [_image_json(snap, t, j.source, j.destinations, j.line) for t, j in snap.jobs],
        "expansions": [
            snap.expansions[e].model_dump(mode="json") if e in snap.expansions
            else {"source": j.source, "line": j.line, "status": "pending"}
            for e, j in zip(snap.meta.expansion_ids, snap.meta.expansions, strict=True)
        ],
        "cleanups": [c.model_dump(mode="json") for c in snap.cleanups.values()],
    }
    if summary.wall is not None:
        doc["summary"]["wall_s"] = round(summary.wall, 3)
    return doc


def _image_json(snap: BatchSnapshot, tid: str, source: str, destinations: list[str], line: int) -> dict[str, Any]:
    r = snap.results.get(tid)
    if r is not None:
        doc = r.model_dump(mode="json")
    else:
        state = snap.states.get(tid)
        doc = {"source": source, "destinations": destinations, "status": "pending", "line": line,
               "state": state.model_dump(mode="json") if state else {"phase": "queued"}}
    earlier = snap.meta.earlier_tasks(tid)
    doc["retried"] = len(earlier)
    if earlier:
        doc["earlier"] = [snap.history[t].model_dump(mode="json") for t in earlier if t in snap.history]
    return doc
