"""One rule for what a sync reports, whichever engine ran it."""

from __future__ import annotations

from config.jobs import DestinationResult, SyncJob
from workers.engine.errors import Denied, NotFound, ServerError, TransportError
from workers.engine.results import sync_result

JOB = SyncJob(batch_id="b", source="src.example/app:v1", destinations=["a.example/app:v1", "b.example/app:v1"],
              line=7)


def dest(name: str, status: str) -> DestinationResult:
    return DestinationResult(destination=name, status=status)  # type: ignore[arg-type]


def test_task_is_retried_only_when_every_failure_may_pass() -> None:
    both_down = sync_result(JOB, "docker", failures=[TransportError("reset"), ServerError("503", status=503)])
    assert both_down.status == "failed" and both_down.temporary
    # One destination refuses for good: retrying the task cannot fix it.
    mixed = sync_result(JOB, "registry", failures=[TransportError("reset"), Denied("no push", status=403)])
    assert mixed.status == "failed" and not mixed.temporary
    assert mixed.error == "reset; no push" and mixed.error_code == "TransportError"
    bad = sync_result(JOB, "registry", failures=[ValueError("invalid reference 'x::y'")])
    assert not bad.temporary and bad.error_code == "INVALID_REFERENCE"
    assert not sync_result(JOB, "registry", failures=[NotFound("manifest unknown", status=404)]).temporary


def test_status_follows_the_destinations() -> None:
    fresh = sync_result(JOB, "registry", destinations=[dest("a", "up_to_date"), dest("b", "up_to_date")])
    assert fresh.status == "up_to_date" and fresh.error is None and not fresh.temporary
    some = sync_result(JOB, "registry", destinations=[dest("a", "up_to_date"), dest("b", "synced")])
    assert some.status == "synced"
    assert sync_result(JOB, "docker").status == "synced"


def test_engines_leave_timing_line_and_node_to_the_task_layer() -> None:
    r = sync_result(JOB, "docker", failures=[TransportError("reset")], local_refs=["src.example/app:v1"])
    assert (r.batch_id, r.source, r.engine, r.local_refs) == ("b", JOB.source, "docker", ["src.example/app:v1"])
    assert (r.line, r.node, r.started_at, r.duration_s, r.task_id) == (0, "", 0.0, 0.0, "")
