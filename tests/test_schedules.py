"""Schedules end to end: real Redis, real worker and beat processes, real registries."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from tests.support.cluster import Cluster, make_cluster_fixture  # noqa: F401  (fixture)
from tests.support.faultproxy import FaultProxy, Rule, delay
from tests.support.images import Pusher, push_image
from tests.support.procs import wait_until
from tests.support.registry import Registry
from tests.support.workers import Beat, run_producer

pytestmark = pytest.mark.schedules

NAME = "every5"


def history(c: Cluster, name: str = NAME) -> list[tuple[int, str]]:
    """(run time, what happened) for every run the workers saw, oldest first."""
    with c.redis.client() as r:
        raw = r.lrange(f"ferry:schedule:{name}:history", 0, -1)
    return [(int(run), event) for run, _, event in (e.decode().partition(" ") for e in reversed(raw))]


def count(c: Cluster, what: str) -> int:
    return sum(event.startswith(what) for _, event in history(c))


def batches(c: Cluster, name: str = NAME) -> list[str]:
    with c.redis.client() as r:
        return sorted(b.decode() for b in r.zrange("ferry:batches", 0, -1) if b.decode().startswith(f"{name}-"))


@contextmanager
def beats(c: Cluster, schedule: dict[str, object]) -> Iterator[Callable[[], Beat]]:
    env = {**c.env, "FERRY_SCHEDULES": json.dumps([schedule])}
    started: list[Beat] = []

    def start() -> Beat:
        b = Beat(env, c.tmp / f"beat{len(started)}.log").start()
        started.append(b)
        return b

    try:
        yield start
    finally:
        for b in started:
            b.stop()
        print("".join(b.log() for b in started)[-4000:])


def test_a_schedule_fires_skips_while_its_batch_runs_and_survives_beat_kills(
        make_cluster: Callable[..., Cluster], src: Registry, dst: Registry, src_pusher: Pusher,
        make_fault_proxy: Callable[[str], FaultProxy]) -> None:
    c = make_cluster()
    c.start_worker("node-a", concurrency=2)
    push_image(src_pusher, "lib/app", layers=1)
    proxy = make_fault_proxy(src.host)
    schedule = {"name": NAME, "lines": [f"{proxy.host}/lib/app:v1"], "targets": [f"{dst.host}/mirror"], "every": 5}
    with beats(c, schedule) as start:
        first = start()
        wait_until(lambda: count(c, "fired") >= 2, 60, "two runs fired")
        assert dst.manifest_digest("mirror/lib/app", "v1") is not None

        # The next run's batch waits 12 s on the source: the runs that fall due meanwhile are skipped.
        proxy.add_rule(Rule(delay(12), path_re=r"/manifests/v1$", times=1))
        wait_until(lambda: count(c, "skipped") >= 1, 45, "a run skipped")

        # SIGKILL the beat, start it again 2 s later, and once it runs a second one beside it.
        first.kill()
        killed = time.time()
        time.sleep(2)
        again = start()
        wait_until(lambda: f"schedule {NAME}: every 5 s" in again.log(), 60, "the beat back")
        back = time.time()
        start()
        before = count(c, "fired")
        wait_until(lambda: count(c, "fired") >= before + 2, 90, "two runs fired after the restart")
    events = history(c)
    # In the order they were fired (a run the kill left claimed but unsent comes 10 s late).
    runs = sorted(run for run, _ in events)
    # Every run once — fired or skipped — and none fired twice. The only runs missing are ones that fell
    # due while no beat ran (its start takes seconds on a busy machine): those fire once, as the latest.
    assert len(runs) == len(set(runs)), events
    missing = set(range(runs[0], runs[-1], 5)) - set(runs)
    assert all(killed < m < back for m in missing), (missing, killed, back, events)
    down = range(math.ceil(killed / 5) * 5, math.ceil(back), 5)
    assert not down or down[-1] in runs, (list(down), events)  # the latest run due while down still fired
    skipped = [e for _, e in events if e.startswith("skipped")]
    assert skipped and all(re.fullmatch(rf"skipped \({NAME}-\d{{8}}-\d{{6}} still running\)", e) for e in skipped)
    # Every run that fired is one ordinary batch named after the schedule and its time.
    fired = [e.removeprefix("fired ") for _, e in events if e.startswith("fired")]
    assert len(fired) >= 4 and sorted(fired) == batches(c)
    logs = c.logs()
    assert f"schedule {NAME}: skipping the run at" in logs
    beat_logs = "".join((c.tmp / f"beat{i}.log").read_text() for i in range(3))
    # Each run is sent once; only a run whose sender died before marking it sent goes out again,
    # and the worker drops that copy.
    sent = re.findall(rf"schedule {NAME}: sent the run at ([^\n]+)", beat_logs)
    resent = re.findall(rf"schedule {NAME}: the run at ([^\n]+?) was claimed", beat_logs)
    assert len(sent) - len(set(sent)) <= len(resent) <= 1 and len(set(sent)) >= len(runs), beat_logs
    assert logs.count("already fired") == len(resent)
    wait_until(lambda: all(len(c.results(b)) == 1 for b in fired), 60, "every fired batch done")
    listed = run_producer(["batches"], {**c.env, "COLUMNS": "200"})
    assert listed.returncode == 0 and all(b in listed.stdout for b in fired[-3:]), listed


def test_a_run_claimed_but_never_sent_is_sent_by_the_next_beat_and_fires_once(
        make_cluster: Callable[..., Cluster], src: Registry, dst: Registry, src_pusher: Pusher) -> None:
    c = make_cluster()
    c.start_worker("node-a", concurrency=1)
    push_image(src_pusher, "lib/app", layers=1)
    now = time.time()
    run = int(now // 86400 * 86400)
    # What a beat SIGKILLed between claiming today's run and sending it leaves behind; for "copy",
    # a worker also already fired the run from another message.
    with c.redis.client() as r:
        for name in ("daily", "copy"):
            r.hset(f"ferry:schedule:{name}", mapping={"run": run, "sent": run - 86400, "claimed_at": now - 60})
        r.set(f"ferry:schedule:copy:run:{run}", "an-earlier-message")
    line = f"{src.host}/lib/app:v1"
    schedules = [{"name": n, "lines": [line], "targets": [f"{dst.host}/{n}"], "every": 86400}
                 for n in ("daily", "copy")]
    env = {**c.env, "FERRY_SCHEDULES": json.dumps(schedules)}
    beat = Beat(env, c.tmp / "beat.log").start()
    try:
        wait_until(lambda: "already fired" in c.logs() and batches(c, "daily"), 60, "the unsent runs sent")
    finally:
        beat.stop()
    assert "never sent; sending it" in beat.log()
    assert history(c, "daily")[0] == (run, f"fired daily-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(run))}")
    assert history(c, "copy") == [] and batches(c, "copy") == []
    wait_until(lambda: dst.manifest_digest("daily/lib/app", "v1") is not None, 60, "the run's copy")
    assert dst.manifest_digest("copy/lib/app", "v1") is None
