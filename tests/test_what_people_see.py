"""What a person reads: the producer's terminal (run under a 120x35 pty), ``status``, ``report``,
``batches``, the worker log, and Flower's HTTP API — against real registries, Redis, workers and
Flower."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from celery import Celery

from config.describe import human_bytes
from tests.support.cluster import Cluster, make_cluster_fixture  # noqa: F401  (fixture)
from tests.support.images import Image, Pusher, push_image
from tests.support.procs import free_port, port_open, stop, wait_until
from tests.support.registry import Registry
from tests.support.terminal import Terminal
from tests.support.workers import ROOT

pytestmark = pytest.mark.slow

MB = 1000 * 1000
FLOWER_AUTH = ("admin", "flower-pw")


def enqueue_in_terminal(c: Cluster, listing: Path, dst: Registry) -> Terminal:
    return Terminal.run(["-m", "producer", "enqueue", str(listing), "--target", f"{dst.host}/mirror", "--wait"],
                        c.env)


def test_missing_tag_and_repository_read_once_and_precisely(
        make_cluster: Callable[..., Cluster], src: Registry, dst: Registry, src_pusher: Pusher) -> None:
    c = make_cluster()
    c.start_worker("w", concurrency=2)
    api = push_image(src_pusher, "apps/api", layers=2, layer_size=512 * 1024)
    push_image(src_pusher, "apps/worker", layers=1)
    listing = c.listing([f"{src.host}/apps/api:v1", f"{src.host}/apps/worker:v9.9", f"{src.host}/apps/nope:v1"])

    term = enqueue_in_terminal(c, listing, dst)
    assert term.wait(120) == 1, term.text
    out = term.text
    print(out)
    live = [ln for ln in term.lines() if ln.startswith("failed line")]
    assert sorted(live) == [f"failed line 2: no tag v9.9 in {src.host}/apps/worker",
                                 f"failed line 3: no repository {src.host}/apps/nope"]
    # Each reason once: as it happened; the summary's table counts the failures without repeating them.
    assert [ln for ln in term.lines() if ln.lower().startswith("failed line")] == live
    for line in live:  # the image named once per line
        assert line.count(f"{src.host}/apps/") == 1, line
    assert "manifest unknown" not in out
    # The bar ends on bytes moved of bytes expected; the summary adds the average rate.
    moved = human_bytes(stored_bytes(src, api))
    assert re.search(rf"3/3 +{moved} / {moved} ", out), out
    assert re.search(r"average rate +│ +[\d.]+ [kKM]?B/s", out), out


def test_flower_names_results_and_reasons(
        make_cluster: Callable[..., Cluster], src: Registry, dst: Registry, src_pusher: Pusher,
        flower: Callable[[Cluster], str]) -> None:
    c = make_cluster(FERRY_TASK_MAX_RETRIES="0")
    c.start_worker("node-a", concurrency=2)
    base = flower(c)
    push_image(src_pusher, "apps/api", layers=3)
    push_image(src_pusher, "apps/same", layers=1)
    listing = c.listing([f"{src.host}/apps/same:v1"])
    assert c.producer("enqueue", str(listing), "--target", f"{dst.host}/mirror", "--wait").returncode == 0
    listing = c.listing([f"{src.host}/apps/api:v1", f"{src.host}/apps/same:v1", f"{src.host}/apps/api:v9.9"])
    run = c.producer("enqueue", str(listing), "--target", f"{dst.host}/mirror", "--wait")
    assert run.returncode == 1, run.stdout + run.stderr

    def tasks() -> dict[str, dict[str, object]]:
        return dict(httpx.get(f"{base}/api/tasks", auth=FLOWER_AUTH, timeout=10).json())

    def ended() -> list[str]:
        return sorted(str(t["name"]) for t in tasks().values() if t["state"] in ("SUCCESS", "FAILURE"))

    def succeeded() -> int:
        """What Flower's workers page counts for node-a: task-succeeded events, cleanups included."""
        workers = httpx.get(f"{base}/workers?json=1", auth=FLOWER_AUTH, timeout=10).json()["data"]
        return sum(int(w.get("task-succeeded", 0)) for w in workers if str(w["hostname"]).startswith("node-a@"))

    # Single-destination syncs stream registry to registry: nothing on disk, so no cleanup follows
    # them, and the worker counts exactly the syncs that succeeded.
    syncs = sorted(f"sync {src.host}/apps/{name}" for name in ("api:v1", "api:v9.9", "same:v1", "same:v1"))
    wait_until(lambda: ended() == syncs, 30, "flower saw every sync end")
    assert succeeded() == 3
    by_name = {str(t["name"]): t for t in tasks().values()}
    synced = by_name[f"sync {src.host}/apps/api:v1"]
    assert synced["state"] == "SUCCESS"
    assert str(synced["args"]) == f"[{src.host}/apps/api:v1 -> {dst.host}/mirror/apps/api:v1]"
    assert re.match(r"\{'summary': 'synced · [\d.]+ [kKM]?B · 4 blobs copied · [\d.]+ s', 'status': 'synced'",
                    str(synced["result"])), synced["result"]
    same = sorted(str(t["result"])[:30] for t in tasks().values() if t["name"] == f"sync {src.host}/apps/same:v1")
    assert same == ["{'summary': 'synced · 66.0 KB ", "{'summary': 'up to date', 'sta"], same
    failed = by_name[f"sync {src.host}/apps/api:v9.9"]
    assert failed["state"] == "FAILURE"
    assert failed["exception"] == f"no tag v9.9 in {src.host}/apps/api"
    assert failed["traceback"] is None
    stored = httpx.get(f"{base}/api/task/result/{failed['uuid']}", auth=FLOWER_AUTH, timeout=10).json()
    assert stored["state"] == "FAILURE" and not stored.get("traceback"), stored
    # The task list's columns include what ran and how it ended.
    page = httpx.get(f"{base}/tasks", auth=FLOWER_AUTH, timeout=10).text
    columns = re.findall(r'<th data-column="(\w+)"', page)
    assert {"name", "state", "args", "result", "exception", "worker"} <= set(columns), columns

    # retry sends the failed image under a new id: Flower keeps the failed attempt beside the new one.
    push_image(src_pusher, "apps/api", tag="v9.9", layers=1)
    assert c.producer("retry", c.latest_batch(), "--wait").returncode == 0
    wait_until(lambda: sorted(str(t["state"]) for t in tasks().values()
                              if t["name"] == f"sync {src.host}/apps/api:v9.9") == ["FAILURE", "SUCCESS"], 30,
               "flower to show both attempts")

    # Two destinations go through the node cache: that sync, and only that one, is followed by a
    # cleanup, shown under the image it cleaned up after.
    two = c.listing([f"{src.host}/apps/api:v1"])
    assert c.producer("enqueue", str(two), "--target", f"{dst.host}/copy-a", "--target", f"{dst.host}/copy-b",
                      "--wait").returncode == 0
    cleanup_name = f"cleanup node-a after sync {src.host}/apps/api:v1"
    wait_until(lambda: ended().count(cleanup_name) == 1, 30, "flower saw the cleanup end")
    cleanups = [str(t["name"]) for t in tasks().values() if str(t["name"]).startswith("cleanup ")]
    assert cleanups == [cleanup_name], cleanups
    cleanup = next(t for t in tasks().values() if t["name"] == cleanup_name)
    assert str(cleanup["result"]).startswith("{'summary': '"), cleanup
    # The dashboard counts the five syncs that succeeded and the one cleanup, not a cleanup per sync.
    wait_until(lambda: succeeded() == 6, 30, "flower to count the cleanup")

    # A queued task reads the same before any worker has it.
    c.worker("node-a").stop()
    c.producer("enqueue", str(c.listing([f"{src.host}/apps/queued:v1"])), "--target", f"{dst.host}/mirror")
    wait_until(lambda: any(t["name"] == f"sync {src.host}/apps/queued:v1" and t["state"] == "PENDING"
                           for t in tasks().values()), 30, "flower to list the queued task")
    assert not [t for t in tasks().values() if str(t["name"]).startswith("ferry.")]

    # The worker log: the failure as one line with its reason; no traceback, no line per request.
    log = c.logs()
    lines = [ln for ln in log.splitlines() if "apps/api:v9.9" in ln and "raised" in ln]
    assert len(lines) == 1 and lines[0].endswith(f"raised expected: no tag v9.9 in {src.host}/apps/api"), lines
    assert "Traceback" not in log and "raised unexpected" not in log
    assert "HTTP Request:" not in log


def _event_types(sub: redis.client.PubSub, quiet: float) -> list[str]:
    """Every event type published until ``quiet`` seconds pass without one (a worker sends its
    task events in batches, ``task.multi``, whose body is a list)."""
    seen: list[str] = []
    deadline = time.monotonic() + quiet
    while time.monotonic() < deadline:
        msg = sub.get_message(timeout=0.2)
        if msg is None or msg["type"] != "pmessage":
            continue
        body = json.loads(base64.b64decode(json.loads(msg["data"])["body"]))
        seen += [e["type"] for e in (body if isinstance(body, list) else [body])]
        deadline = time.monotonic() + quiet
    return seen


def test_workers_send_task_events_only_while_asked(
        make_cluster: Callable[..., Cluster], src: Registry, dst: Registry, src_pusher: Pusher) -> None:
    """A cluster nobody watches spends nothing on task events; a monitor's enable_events (Flower
    sends it as it starts and every 5 s) turns them on."""
    c = make_cluster()
    c.start_worker("w", concurrency=2)
    push_image(src_pusher, "apps/a", layers=1)
    push_image(src_pusher, "apps/b", layers=1)
    with c.redis.client() as r, r.pubsub() as sub:
        sub.psubscribe("/0.celeryev/task.*")
        assert c.producer("enqueue", str(c.listing([f"{src.host}/apps/a:v1"])), "--target", f"{dst.host}/m",
                          "--wait").returncode == 0
        assert _event_types(sub, 3) == ["task-sent"]  # the producer's, for Flower's queued list
        app = Celery(broker=c.redis.url)
        replies = app.control.broadcast("enable_events", reply=True, timeout=10)
        app.close()
        assert len(replies) == 1, replies  # the worker has turned them on
        assert c.producer("enqueue", str(c.listing([f"{src.host}/apps/b:v1"])), "--target", f"{dst.host}/m",
                          "--wait").returncode == 0
        seen = _event_types(sub, 3)
    assert {"task-sent", "task-received", "task-started", "task-succeeded"} <= set(seen), seen


@pytest.fixture
def flower() -> Iterator[Callable[[Cluster], str]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(c: Cluster) -> str:
        port = free_port()
        with open(c.tmp / "flower.log", "ab") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "workers", "flower", "--port", str(port),
                                           "--basic-auth", ":".join(FLOWER_AUTH)],
                                          cwd=ROOT, env=c.env, stdout=log, stderr=log, start_new_session=True))
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: port_open(port), 60, "flower")
        # Flower follows the worker's events once it has seen the worker.
        wait_until(lambda: bool(httpx.get(f"{base}/api/workers", auth=FLOWER_AUTH, timeout=10).json()), 60,
                   "flower to see the worker")
        return base

    yield start
    for p in procs:
        stop(p)


def test_unreachable_registry_retries_visibly_then_retry_reports_its_own_work(
        make_cluster: Callable[..., Cluster], make_registry: Callable[..., Registry], dst: Registry) -> None:
    c = make_cluster(FERRY_TASK_MAX_RETRIES="1", FERRY_RETRY__ATTEMPTS="3")
    c.start_worker("w", concurrency=2)
    up, down = make_registry("up"), make_registry("down")
    pushers = [Pusher(up.url), Pusher(down.url)]
    big = push_image(pushers[0], "apps/big", layers=2, layer_size=2 * MB)
    small = push_image(pushers[1], "apps/small", layers=1, layer_size=256 * 1024)
    for p in pushers:
        p.client.close()
    small_bytes, big_bytes = stored_bytes(down, small), stored_bytes(up, big)
    down.stop()  # connection refused from now on
    listing = c.listing([f"{down.host}/apps/small:v1", f"{up.host}/apps/big:v1"], name="mirror-list.txt")

    term = enqueue_in_terminal(c, listing, dst)
    refused = rf"{re.escape(down.host)}/apps/small:v1: connection refused to {re.escape(down.host)}"
    # The first refused request shows at once, while the run is still retrying it...
    wait_until(lambda: term.first_seen(r"retrying line 1") is not None, 30, "a retrying line")
    enqueued = term.first_seen(r"2 image\(s\) enqueued")
    request = term.first_seen(rf"retrying line 1 \(request retry [12]/2 in [\d.]+ s, attempt 1/2\): {refused}")
    assert enqueued is not None and request is not None, term.text
    print(f"\nretrying shown {request - enqueued:.2f} s after the batch was enqueued")
    assert request - enqueued < 2.0
    # ...then, once the run gives up, the wait for the next one.
    wait_until(lambda: term.first_seen(r"retrying line 1 \(attempt 2/2") is not None, 30, "the next run's line")
    retrying = term.first_seen(rf"retrying line 1 \(attempt 2/2 in [\d.]+ s\): {refused}")
    assert retrying is not None and retrying > request, term.text
    batch = c.latest_batch()
    # status, meanwhile, lists the image with its next attempt's time.
    status = c.producer("status", batch)
    print(status.stdout)
    assert status.returncode == 1
    assert re.search(rf"^  retrying line 1 \(attempt 2/2 at \d\d:\d\d:\d\d, in [\d.]+ s\): {refused}$",
                     status.stdout, re.MULTILINE), status.stdout

    code = term.wait(120)
    out = term.text
    print(out)
    assert code == 1, out
    assert f"failed line 1 (after 2 attempts): {down.host}/apps/small:v1: connection refused to {down.host}" in out
    status = c.producer("status", batch)
    assert f"failed line 1 (after 2 attempts): {down.host}/apps/small:v1: connection refused" in status.stdout
    assert re.search(r"2 of 2 done · 1 synced · 0 up to date · 1 failed · [\d.]+ MB moved", status.stdout), \
        status.stdout
    sdoc = json.loads(c.producer("status", batch, "--json", "-").stdout)
    assert (sdoc["done"], sdoc["failed"], sdoc["bytes_moved"]) == (2, 1, big_bytes)
    assert [(i["line"], i["source"]) for i in sdoc["failed_images"]] == [(1, f"{down.host}/apps/small:v1")]

    time.sleep(2)  # an idle gap the batch's active time leaves out
    down.start()
    retry = Terminal.run(["-m", "producer", "retry", batch, "--wait", "--json", str(c.tmp / "retry.json")], c.env)
    assert retry.wait(60) == 0, retry.text
    print(retry.text)
    doc = json.loads((c.tmp / "retry.json").read_text())
    # The retry's own figures: one image, its bytes, its seconds.
    assert (doc["summary"]["total"], doc["summary"]["synced"]) == (1, 1)
    assert doc["summary"]["bytes"] == small_bytes
    assert doc["summary"]["elapsed_s"] < 10
    assert doc["summary"]["rate_bytes_per_s"] == pytest.approx(small_bytes / doc["summary"]["elapsed_s"], rel=0.01)
    assert f"batch {batch} now: 2 synced, 0 up to date, 0 failed of 2" in retry.text

    report = Terminal.run(["-m", "producer", "report", batch], c.env)
    assert report.wait(30) == 0, report.text
    print(report.text)
    row = next(ln for ln in report.lines() if "apps/small:v1" in ln)
    assert re.search(r"│ synced +│ .* │ once +│$", row), row
    active = _seconds(report.text, "active time")
    wall = _seconds(report.text, "wall time")
    assert wall - active > 2, (active, wall)
    jdoc = json.loads(c.producer("report", batch, "--json", "-").stdout)
    assert jdoc["summary"]["bytes"] == big_bytes + small_bytes
    small_doc = next(i for i in jdoc["images"] if "apps/small" in i["source"])
    assert small_doc["retried"] == 1 and small_doc["earlier"][0]["status"] == "failed"

    batches = Terminal.run(["-m", "producer", "batches"], c.env)
    assert batches.wait(30) == 0, batches.text
    print(batches.text)
    row = next(ln for ln in batches.lines() if batch in ln)
    assert re.search(rf"{batch} +\d{{4}}-\d\d-\d\d \d\d:\d\d +mirror-list.txt +2 +ok: 2 synced \(retried once\)",
                     row), row


def stored_bytes(reg: Registry, img: Image) -> int:
    """What a copy of ``img`` uploads: every blob it references, config included."""
    return sum(int(httpx.head(f"{reg.url}/v2/{img.repo}/blobs/{d}").headers["Content-Length"]) for d in img.blobs)


def _seconds(text: str, label: str) -> float:
    m = re.search(rf"{label} +│ +([\d.]+) s", text)
    assert m, text
    return float(m.group(1))
