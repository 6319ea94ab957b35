"""Summaries of a batch: counts, failures with reasons, bytes, time — as a table or JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from workers.batches import BatchSnapshot

OK, FAILED = 0, 1


@dataclass
class Summary:
    total: int
    synced: int = 0
    up_to_date: int = 0
    failed: int = 0
    pending: int = 0
    bytes: int = 0
    elapsed: float = 0.0
    failures: list[tuple[int, str, str]] = field(default_factory=list)  # (line, source, reason)
    warnings: list[str] = field(default_factory=list)
    freed_bytes: int = 0

    @property
    def exit_code(self) -> int:
        return OK if self.failed == 0 and self.pending == 0 else FAILED


def summarize(snap: BatchSnapshot, elapsed: float | None = None) -> Summary:
    s = Summary(total=len(snap.meta.task_ids))
    for tid in snap.meta.task_ids:
        r = snap.results.get(tid)
        if r is None:
            s.pending += 1
            continue
        s.bytes += r.bytes_transferred
        if r.status == "synced":
            s.synced += 1
        elif r.status == "up_to_date":
            s.up_to_date += 1
        else:
            s.failed += 1
            s.failures.append((r.line, r.source, r.error or "unknown error"))
        s.warnings += [f"{r.source}: {w}" for w in r.warnings]
    s.freed_bytes = sum(c.freed_bytes for c in snap.cleanups.values())
    if elapsed is None:
        ends = [r.started_at + r.duration_s for r in snap.results.values()]
        elapsed = (max(ends) - snap.meta.created_at) if ends else 0.0
    s.elapsed = elapsed
    return s


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def render(console: Console, snap: BatchSnapshot, summary: Summary, *, details: bool = False) -> None:
    table = Table(title=f"batch {snap.meta.batch_id}", show_header=True, header_style="bold")
    table.add_column("result")
    table.add_column("images", justify="right")
    table.add_row("[green]synced[/]", str(summary.synced))
    table.add_row("[cyan]already up to date[/]", str(summary.up_to_date))
    table.add_row("[red]failed[/]", str(summary.failed))
    if summary.pending:
        table.add_row("[yellow]not finished[/]", str(summary.pending))
    table.add_row("bytes transferred", human_bytes(summary.bytes))
    table.add_row("time", f"{summary.elapsed:.1f} s")
    if summary.freed_bytes:
        table.add_row("freed by cleanup", human_bytes(summary.freed_bytes))
    console.print(table)
    if details:
        per = Table(show_header=True, header_style="bold")
        for col in ("line", "source", "status", "destinations", "node", "bytes"):
            per.add_column(col)
        for tid, job in zip(snap.meta.task_ids, snap.meta.jobs, strict=True):
            r = snap.results.get(tid)
            status = r.status if r else snap.states.get(tid, "queued")
            per.add_row(str(job.line), escape(job.source), escape(status), escape("\n".join(job.destinations)),
                        r.node if r else "", human_bytes(r.bytes_transferred) if r else "")
        console.print(per)
    for line, source, reason in summary.failures:
        console.print(f"[red]FAILED[/] line {line}: {escape(source)}: {escape(reason)}", highlight=False,
                      soft_wrap=True)
    for w in summary.warnings:
        console.print(f"[yellow]warning[/] {escape(w)}", highlight=False, soft_wrap=True)


def as_json(snap: BatchSnapshot, summary: Summary) -> dict[str, Any]:
    return {
        "batch_id": snap.meta.batch_id,
        "summary": {
            "total": summary.total, "synced": summary.synced, "up_to_date": summary.up_to_date,
            "failed": summary.failed, "pending": summary.pending, "bytes": summary.bytes,
            "elapsed_s": round(summary.elapsed, 3), "freed_bytes": summary.freed_bytes,
        },
        "images": [
            snap.results[t].model_dump(mode="json") if t in snap.results
            else {"source": j.source, "destinations": j.destinations, "status": "pending",
                  "state": snap.states.get(t, "queued"), "line": j.line}
            for t, j in zip(snap.meta.task_ids, snap.meta.jobs, strict=True)
        ],
        "cleanups": [c.model_dump(mode="json") for c in snap.cleanups.values()],
    }
