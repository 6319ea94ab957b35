"""How outcomes read to a person: one wording for the terminal, ``report``, Flower and worker logs.

Pure functions of the shared models. A line about an image names it once: a reason that
already names the image's repository (``no tag v9.9 in registry/apps/worker``) stands alone,
any other reason follows the image.
"""

from __future__ import annotations

import time
from typing import Any

from config.expansion import ExpandJob, ExpandResult, PruneResult
from config.jobs import CleanupResult, DestinationResult, SyncJob, SyncResult, TaskState
from config.reference import name_of


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_seconds(s: float) -> str:
    """``2.4 s``, ``20 s``, ``3 min 05 s``, ``1 h 02 min``."""
    if s < 10:
        return f"{max(s, 0.0):.1f} s"
    whole = round(s)
    if whole < 60:
        return f"{whole} s"
    minutes, seconds = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def countdown(s: float) -> str:
    """Time until something: tenths below ten seconds (``0.4 s``, a request's retry), whole seconds
    (``20 s``), minutes past a minute."""
    if s < 9.95:
        return f"{max(0.0, s):.1f} s"
    return f"{round(s)} s" if s < 59.5 else human_seconds(s)


def human_rate(nbytes: float, seconds: float) -> str:
    return f"{human_bytes(nbytes / seconds)}/s" if seconds > 0 else "-"


def times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


def clock(ts: float) -> str:
    """A wall-clock time in this machine's zone, to the second."""
    return time.strftime("%H:%M:%S", time.localtime(ts))


def date_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


# -- task names (what Flower and the worker log call a task) ----------------------------------

def sync_task_name(source: str) -> str:
    return f"sync {source}"


def sync_task_args(job: SyncJob) -> str:
    """What Flower shows as a sync task's arguments: image references only."""
    return f"[{job.source} -> {', '.join(job.destinations)}]"


def expand_task_name(source: str) -> str:
    return f"expand {source}"


def expand_task_args(job: ExpandJob) -> str:
    """A selector line as Flower shows it: the options, the repository and where its tags go."""
    return f"[{job.selector.describe()} {job.source} -> {', '.join(job.destinations)}]"


def cleanup_task_name(node: str, why: str) -> str:
    """``why``: ``after sync <image>``, ``periodic`` or ``disk low``."""
    return f"cleanup {node} {why}"


# -- one image ---------------------------------------------------------------------------------

def names_image(reason: str, image: str) -> bool:
    """Whether ``reason`` already says which repository it is about."""
    return name_of(image) in reason


def _blob_counts(dests: list[DestinationResult]) -> str:
    copied = sum(d.blobs_copied for d in dests)
    mounted = sum(d.blobs_mounted for d in dests)
    present = sum(d.blobs_skipped for d in dests)
    parts = [f"{copied} blob{'s' if copied != 1 else ''} copied"] if copied else []
    parts += [f"{mounted} mounted"] if mounted else []
    parts += [f"{present} already there"] if present else []
    return ", ".join(parts)


def failure_text(r: SyncResult) -> str:
    """The reason an image failed, as Flower's exception and the worker log show it."""
    return r.error or "unknown error"


def result_summary(r: SyncResult) -> str:
    """``synced · 12.6 MB · 6 blobs copied, 2 mounted · 2.4 s`` / ``up to date`` / ``failed: …``."""
    if r.status == "up_to_date":
        return "up to date"
    if r.status == "would_copy":
        blobs = sum(d.blobs_copied for d in r.destinations)
        return f"would copy ({blobs} blob{'s' if blobs != 1 else ''}, {human_bytes(r.bytes_transferred)})"
    if r.status == "failed":
        return f"failed: {failure_text(r)}"
    parts = ["synced", human_bytes(r.bytes_transferred), _blob_counts(r.destinations), human_seconds(r.duration_s)]
    return " · ".join(p for p in parts if p)


def _head(verb: str, line: int, note: str) -> str:
    return f"{verb} line {line}" + (f" ({note})" if note else "")


def image_line(verb: str, line: int, source: str, reason: str, note: str = "") -> str:
    """``failed line 4: <reason>``, with the image before the reason when the reason does not name it."""
    head = _head(verb, line, note)
    return f"{head}: {reason}" if names_image(reason, source) else f"{head}: {source}: {reason}"


def failure_line(r: SyncResult, verb: str = "failed") -> str:
    """One line per failed image; a destination's failure reads ``source → destination: reason``.
    A dry run's ``verb`` is ``would fail``."""
    note = f"after {r.attempts} attempts" if r.attempts > 1 else ""
    failed = [d for d in r.destinations if d.status == "failed"]
    if failed:
        to = "; ".join(f"{d.destination}: {d.error}" for d in failed)
        return f"{_head(verb, r.line, note)}: {r.source} → {to}"
    return image_line(verb, r.line, r.source, failure_text(r), note)


def plan_line(r: SyncResult, destinations: list[str]) -> str:
    """A dry run's verdict on one image: ``line 4: src -> dst: would copy (2 blobs, 1.2 KB)``."""
    verdict = f"would fail: {failure_text(r)}" if r.status == "failed" else result_summary(r)
    return f"line {r.line}: {r.source} -> {', '.join(destinations)}: {verdict}"


# -- selector lines ------------------------------------------------------------------------------

def expansion_summary(e: ExpandResult) -> str:
    """``4 of 31 tags selected: v1.30.2, v1.30.1, …`` / ``listing tags failed: …``."""
    if e.status == "failed":
        return f"listing tags failed: {e.error or 'unknown error'}"
    shown = ", ".join(e.selected[:8]) + (", ..." if len(e.selected) > 8 else "")
    return f"{len(e.selected)} of {e.listed} tags selected" + (f": {shown}" if shown else "")


def expansion_line(e: ExpandResult) -> str:
    """``expanded line 3: registry/repo: 4 of 31 tags selected: …`` / ``failed line 3: …``."""
    return image_line("failed" if e.status == "failed" else "expanded", e.line, e.source, expansion_summary(e))


def prune_lines(p: PruneResult, line: int, *, dry_run: bool) -> list[tuple[bool, str]]:
    """(whether it is a problem, text) for one destination repository a selector line pruned."""
    gone = p.would_delete if dry_run else p.deleted
    verb = "would delete" if dry_run else "deleted"
    lines = [(False, f"prune line {line}: {p.repository}: {verb} {len(gone)} tag(s)"
                     + (f": {', '.join(gone)}" if gone else ""))]
    lines += [(False, f"prune line {line}: {p.repository}: {p.note}")] if p.note else []
    lines += [(True, f"prune line {line}: {p.repository}: kept {tag}: {why}") for tag, why in p.failed.items()]
    return lines


def retry_line(line: int, source: str, state: TaskState, now: float, *, at: bool = False) -> str:
    """``retrying line 2 (attempt 2/4 in 20 s): connection refused to 127.0.0.1:5998``, or, while a
    request of the run under way waits, ``retrying line 2 (request retry 1/5 in 0.4 s, attempt 1/4): …``."""
    request = state.request
    retry_at, reason = (request.retry_at, request.reason) if request else (state.retry_at, state.reason)
    when = ""
    if retry_at is not None:
        when = (f" at {clock(retry_at)}," if at else "") + f" in {countdown(max(0.0, retry_at - now))}"
    note = f"attempt {state.attempt}/{state.attempts}"
    note = f"request retry {request.failure}/{request.attempts - 1}{when}, {note}" if request else note + when
    return image_line("retrying", line, source, reason or "temporary failure", note)


def running_line(line: int, source: str, state: TaskState) -> str:
    attempt = f", attempt {state.attempt}/{state.attempts}" if state.attempt > 1 else ""
    return f"running line {line}: {source} (on {state.node or '?'}{attempt})"


def _without_empty(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if v not in (None, "", [], {})}


def flower_result(r: SyncResult) -> dict[str, Any]:
    """A sync task's return value: the summary first, then the fields that matter, numbers rounded."""
    return _without_empty({
        "summary": result_summary(r),
        "status": r.status,
        "source": r.source,
        "digest": r.source_digest,
        "destinations": [_without_empty({
            "destination": d.destination, "status": d.status, "digest": d.digest,
            "blobs": _blob_counts([d]), "bytes": d.bytes_transferred, "error": d.error,
        }) for d in r.destinations],
        "bytes": r.bytes_transferred,
        "seconds": round(r.duration_s, 1),
        "attempts": r.attempts if r.attempts > 1 else None,
        "node": r.node,
        "batch": r.batch_id,
        "line": r.line,
        "warnings": r.warnings,
    })


# -- cleanups ----------------------------------------------------------------------------------

def cleanup_summary(c: CleanupResult) -> str:
    """``freed 12.0 MB (3 items) · kept 40.0 MB (10 items)``."""
    freed = f"freed {human_bytes(c.freed_bytes)} ({c.freed_items} items)" if c.freed_items else "nothing to free"
    parts = [freed, f"kept {human_bytes(c.kept_bytes)} ({c.kept_items} items)"]
    if c.errors:
        parts.append(f"{len(c.errors)} error{'s' if len(c.errors) != 1 else ''}: {c.errors[0]}")
    return " · ".join(parts)


def flower_cleanup(c: CleanupResult) -> dict[str, Any]:
    return {"summary": cleanup_summary(c), **c.model_dump(mode="json", exclude_defaults=True)}
