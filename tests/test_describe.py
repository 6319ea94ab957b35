"""The one wording of outcomes: lines name an image once, summaries and figures read as people say them.

End to end (terminal, report, Flower, logs) in tests/test_what_people_see.py; here the rules
themselves, on results shaped like the engines' own.
"""

from __future__ import annotations

from config import describe
from config.jobs import DestinationResult, RequestRetry, SyncResult, TaskState
from contract.batches import Tally
from producer.progress import Finished, Meter, Volume
from producer.report import active_seconds

SRC = "127.0.0.1:5902/apps/worker:v9.9"


def result(**kw: object) -> SyncResult:
    return SyncResult.model_validate({"batch_id": "b", "source": SRC, "status": "failed", "line": 4, **kw})


def test_a_failure_line_names_the_image_once() -> None:
    # The reason names the repository: it stands alone.
    missing = result(error="no tag v9.9 in 127.0.0.1:5902/apps/worker")
    assert describe.failure_line(missing) == "failed line 4: no tag v9.9 in 127.0.0.1:5902/apps/worker"
    # It does not: the image comes first.
    refused = result(error="connection refused to 127.0.0.1:5902", attempts=4)
    assert describe.failure_line(refused) == \
        f"failed line 4 (after 4 attempts): {SRC}: connection refused to 127.0.0.1:5902"
    # A destination's failure names the destination, after the image it was a copy of.
    dst = DestinationResult(destination="10.0.0.1:5000/m/worker:v9.9", status="failed", error="access denied")
    denied = result(error="10.0.0.1:5000/m/worker:v9.9: access denied", destinations=[dst])
    assert describe.failure_line(denied) == f"failed line 4: {SRC} → 10.0.0.1:5000/m/worker:v9.9: access denied"
    assert describe.result_summary(missing) == "failed: no tag v9.9 in 127.0.0.1:5902/apps/worker"


def test_a_retry_line_says_which_attempt_comes_when() -> None:
    state = TaskState(phase="retrying", attempt=2, attempts=4, retry_at=1000.0,
                      reason="connection refused to 127.0.0.1:5998")
    assert describe.retry_line(2, "127.0.0.1:5998/down/x:v1", state, now=980.4) == \
        "retrying line 2 (attempt 2/4 in 20 s): 127.0.0.1:5998/down/x:v1: connection refused to 127.0.0.1:5998"
    at = describe.retry_line(2, "127.0.0.1:5998/down/x:v1", state, now=980.4, at=True)
    assert at.startswith(f"retrying line 2 (attempt 2/4 at {describe.clock(1000.0)}, in 20 s): ")


def test_a_request_retried_inside_a_run_says_so() -> None:
    waiting = RequestRetry(what="HEAD manifest", failure=1, attempts=6, retry_at=1000.4,
                           reason="connection refused to 127.0.0.1:5998")
    state = TaskState(phase="running", attempt=1, attempts=4, request=waiting)
    assert state.retrying and not TaskState(phase="running").retrying
    assert describe.retry_line(2, "127.0.0.1:5998/down/x:v1", state, now=998.0) == (
        "retrying line 2 (request retry 1/5 in 2.4 s, attempt 1/4): 127.0.0.1:5998/down/x:v1: "
        "connection refused to 127.0.0.1:5998")


def test_a_sync_summary_and_its_flower_result() -> None:
    dests = [DestinationResult(destination="d/a:v1", status="synced", blobs_copied=6, blobs_mounted=2,
                               bytes_transferred=12_600_000)]
    r = result(status="synced", error=None, destinations=dests, duration_s=2.4321, started_at=1.7e9)
    assert describe.result_summary(r) == "synced · 12.6 MB · 6 blobs copied, 2 mounted · 2.4 s"
    shown = describe.flower_result(r)
    assert next(iter(shown)) == "summary" and shown["seconds"] == 2.4 and "started_at" not in shown
    assert describe.result_summary(result(status="up_to_date", error=None)) == "up to date"


def test_figures_read_as_people_say_them() -> None:
    assert [describe.human_bytes(n) for n in (512, 52_100_000, 93_000_000_000)] == ["512 B", "52.1 MB", "93.0 GB"]
    assert [describe.human_seconds(s) for s in (2.43, 20.4, 185, 3720)] == ["2.4 s", "20 s", "3 min 05 s",
                                                                            "1 h 02 min"]
    assert [describe.countdown(s) for s in (9.97, 9.5, 0.24, -1, 75)] == ["10 s", "9.5 s", "0.2 s", "0.0 s",
                                                                          "1 min 15 s"]
    assert describe.human_rate(4_000_000, 2.0) == "2.0 MB/s" and describe.human_rate(5, 0) == "-"


def test_active_time_leaves_out_the_gaps_between_runs() -> None:
    runs = [result(started_at=100.0, duration_s=10.0), result(started_at=105.0, duration_s=10.0),
            # Celery's retries of one task: from its first run to its end counts as work under way.
            result(first_started_at=130.0, started_at=160.0, duration_s=5.0)]
    assert active_seconds(runs) == 15.0 + 35.0


def volume(watch: list[str], results: dict[str, SyncResult], tally: Tally) -> Volume:
    finished = Finished()
    for t, r in results.items():
        finished.add(t, r)
    return finished.volume(len(watch), set(watch), tally)


def test_bytes_to_move_are_known_or_estimated() -> None:
    done = result(status="synced", error=None, destinations=[
        DestinationResult(destination="d", status="synced", bytes_transferred=40)])
    tally = Tally(results=1, moved={"b": 10}, expected={"b": 60}, states={})
    # a finished (40), b planned (60, 10 moved), c unplanned: the planned images' average.
    assert volume(["a", "b", "c"], {"a": done}, tally) == Volume(moved=50, total=150, estimated=True)
    assert volume(["a", "b"], {"a": done}, tally).text() == "50 B / 100 B"
    nothing = Tally(results=0, moved={}, expected={}, states={})
    assert volume(["a"], {}, nothing) == Volume(0, None, False)

    meter = Meter(started=0.0)
    meter.rate(0.0, 0)
    rate = meter.rate(2.0, 50)
    assert rate == 25.0
    assert meter.eta(2.0, Volume(50, 150, True), rate, done=1, total=3) == 4.0  # by bytes
    assert meter.eta(2.0, Volume(0, None, False), 0.0, done=1, total=3) == 4.0  # by images
