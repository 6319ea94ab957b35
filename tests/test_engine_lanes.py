"""A lane shares the engine's pool among the images in flight: each image gets at most its limit."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from contextvars import ContextVar

import pytest

from workers.engine.lanes import Lane

_who: ContextVar[str] = ContextVar("who", default="nobody")


def test_a_lane_runs_at_most_its_limit_at_once() -> None:
    running, peak, started = 0, 0, list[int]()
    lock = threading.Lock()

    def work(i: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            started.append(i)
        time.sleep(0.02)
        with lock:
            running -= 1
        return i * i

    with ThreadPoolExecutor(max_workers=16) as pool:
        lane = Lane(pool, 3)
        futures = [lane.submit(work, i) for i in range(12)]
        assert [f.result(timeout=5) for f in futures] == [i * i for i in range(12)]
    assert peak == 3 and sorted(started) == list(range(12))


def test_one_at_a_time_keeps_the_order_of_submission() -> None:
    started: list[int] = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        lane = Lane(pool, 1)
        wait([lane.submit(started.append, i) for i in range(20)], timeout=5)
    assert started == list(range(20))


def test_two_lanes_share_one_pool_without_waiting_on_each_other() -> None:
    release = threading.Event()
    with ThreadPoolExecutor(max_workers=4) as pool:
        big, small = Lane(pool, 2), Lane(pool, 2)
        blocked = [big.submit(release.wait, 5) for _ in range(6)]  # 2 run, 4 wait in the big lane
        quick = small.submit(lambda: "done")
        assert quick.result(timeout=2) == "done"
        release.set()
        assert all(f.result(timeout=5) for f in blocked)


def test_calls_run_in_the_submitters_context_whichever_thread_starts_them() -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        lane = Lane(pool, 1)
        token = _who.set("image 7")
        try:
            futures = [lane.submit(_who.get) for _ in range(4)]  # three start from a pool thread
        finally:
            _who.reset(token)
        assert [f.result(timeout=5) for f in futures] == ["image 7"] * 4


def test_a_failure_reaches_its_future_and_the_lane_goes_on() -> None:
    def boom() -> None:
        raise ValueError("registry said no")

    with ThreadPoolExecutor(max_workers=2) as pool:
        lane = Lane(pool, 1)
        failed, after = lane.submit(boom), lane.submit(lambda: 42)
        with pytest.raises(ValueError, match="registry said no"):
            failed.result(timeout=5)
        assert after.result(timeout=5) == 42


def test_cancelled_waiting_calls_never_run() -> None:
    release, ran = threading.Event(), []
    with ThreadPoolExecutor(max_workers=2) as pool:
        lane = Lane(pool, 1)
        first = lane.submit(release.wait, 5)
        waiting = [lane.submit(ran.append, i) for i in range(50)]
        assert all(f.cancel() for f in waiting)
        last = lane.submit(ran.append, "last")
        release.set()
        wait([first, last, *waiting], timeout=5)
        assert last.done() and ran == ["last"]


def test_a_shut_down_pool_fails_the_call_instead_of_hanging_it() -> None:
    pool = ThreadPoolExecutor(max_workers=1)
    pool.shutdown()
    with pytest.raises(RuntimeError, match="shutdown"):
        Lane(pool, 2).submit(lambda: 1).result(timeout=2)
