"""Worker and broker failures: SIGKILLed workers and pool processes, a Redis restart, duplicate delivery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from producer.progress import LOST_LOOK_AFTER
from tests.support.cluster import Cluster, children, make_cluster_fixture, wait_proc  # noqa: F401  (fixture)
from tests.support.faultproxy import FaultProxy, Rule, delay, stall
from tests.support.images import Image, Pusher, push_image
from tests.support.procs import wait_until
from tests.support.registry import Registry
from tests.support.workers import ROOT

pytestmark = pytest.mark.faults

VISIBILITY_TIMEOUT = 10
# kombu sweeps for abandoned messages every timeout/5 seconds (workers/app.py).
SWEEP = VISIBILITY_TIMEOUT / 5
# Seconds the README allows a batch to finish once a SIGKILLed Redis is back (with 6-7 of 9 images to go).
RESTART_BOUND = 20.0
# Two looks for lost messages, LOST_LOOK_AFTER apart once the batch stalls, then the image's copy.
RESEND_BOUND = 2 * LOST_LOOK_AFTER + 10.0

BIG = 4 * 1024 * 1024  # random bytes: gzip keeps them this size


def corpus(pusher: Pusher, n_small: int = 3) -> dict[str, Image]:
    imgs = {"big/b": push_image(pusher, "big/b", layers=1, layer_size=BIG)}
    for i in range(n_small):
        imgs[f"small/s{i}"] = push_image(pusher, f"small/s{i}", layers=2, layer_size=8 * 1024)
    return imgs


def lines_for(host: str, imgs: dict[str, Image]) -> list[str]:
    return [f"{host}/{repo}:v1" for repo in imgs]


def assert_mirrored(dst: Registry, imgs: dict[str, Image]) -> None:
    for repo, img in imgs.items():
        assert dst.manifest_digest(f"mirror/{repo}", "v1") == img.digest, repo


def meta(c: Cluster, batch: str) -> dict[str, Any]:
    with c.redis.client() as r:
        raw = r.get(f"ferry:batch:{batch}:meta")
    assert raw is not None
    return dict(json.loads(raw))


def task_of(c: Cluster, batch: str, repo: str) -> str:
    m = meta(c, batch)
    return next(t for t, j in zip(m["task_ids"], m["jobs"], strict=True) if f"/{repo}:" in j["source"])


def big_layer(imgs: dict[str, Image]) -> str:
    return imgs["big/b"].blobs[1]  # blobs: config, then layers


def stalled_big_blob(proxy: FaultProxy, imgs: dict[str, Image], seconds: float) -> Rule:
    """Hold the big layer's first download open so the copy is in flight when the fault hits."""
    return proxy.add_rule(Rule(stall(seconds, after=256 * 1024), method="GET",
                               path_re=f"/big/b/blobs/{big_layer(imgs)}", times=1))


def in_flight(proxy: FaultProxy, imgs: dict[str, Image]) -> bool:
    return any(s.end is None and s.status == 200 for s in proxy.select("GET", f"/blobs/{big_layer(imgs)}"))


def holder(c: Cluster, batch: str, task: str) -> str:
    state = json.loads(c.hash(batch, "state")[task])
    assert state["phase"] == "running", state
    return str(state["node"])


def running_on(c: Cluster, batch: str, task: str, node: str) -> bool:
    raw = c.hash(batch, "state").get(task)
    state = json.loads(raw) if raw else {}
    return state.get("phase") == "running" and state.get("node") == node


@pytest.mark.measure
def test_worker_killed_mid_blob_is_redelivered_to_another(
        make_cluster: Callable[..., Cluster], src: Registry, dst: Registry, src_pusher: Pusher,
        make_fault_proxy: Callable[[str], FaultProxy]) -> None:
    c = make_cluster(FERRY_VISIBILITY_TIMEOUT=str(VISIBILITY_TIMEOUT))
    for n in ("a", "b"):
        c.start_worker(f"node-{n}", concurrency=1)
    imgs = corpus(src_pusher)
    proxy = make_fault_proxy(src.host)
    stalled_big_blob(proxy, imgs, 120)
    listing = c.listing(lines_for(proxy.host, imgs))
    run = c.producer_bg("enqueue", str(listing), "--target", f"{dst.host}/mirror", "--wait", "--timeout", "180")
    batch = c.latest_batch()
    wait_until(lambda: in_flight(proxy, imgs), 60, "the big blob in flight")
    big = task_of(c, batch, "big/b")
    victim = holder(c, batch, big)

    c.worker(victim).kill()  # the whole process group: main process and pool children
    killed_at = time.monotonic()
    survivor = next(w.node for w in c.workers if w.node != victim)
    wait_until(lambda: running_on(c, batch, big, survivor) or big in c.hash(batch, "results"), 90, "redelivery")
    redelivered = time.monotonic() - killed_at
    print(f"\nREADME (redelivery): another worker took the task {redelivered:.1f} s after the SIGKILL "
          f"(visibility timeout {VISIBILITY_TIMEOUT} s)")

    code, out, err = wait_proc(run, 180)
    assert code == 0, out + err
    assert_mirrored(dst, imgs)
    # The survivor copied it (its own copy outlived the 10 s timeout too and ran again as
    # "already up to date": the first success stays recorded).
    result = c.results(batch)[big]
    assert result["status"] == "synced" and result["node"] == survivor, result
    # The README's range: the visibility timeout from the delivery (a little before the kill: at most
    # SWEEP earlier), then at most one sweep, and a second to pick it up.
    assert VISIBILITY_TIMEOUT - SWEEP <= redelivered <= VISIBILITY_TIMEOUT + SWEEP + 1, redelivered


def test_killed_pool_process_is_requeued_at_once(
        make_cluster: Callable[..., Cluster], src: Registry, dst: Registry, src_pusher: Pusher,
        make_fault_proxy: Callable[[str], FaultProxy]) -> None:
    # A long visibility timeout: only the worker's own requeue can bring the task back quickly.
    c = make_cluster(FERRY_VISIBILITY_TIMEOUT="3600")
    w = c.start_worker("solo", concurrency=1)
    imgs = corpus(src_pusher, n_small=1)
    proxy = make_fault_proxy(src.host)
    stalled_big_blob(proxy, imgs, 120)
    listing = c.listing(lines_for(proxy.host, imgs))
    run = c.producer_bg("enqueue", str(listing), "--target", f"{dst.host}/mirror", "--wait", "--timeout", "120")
    c.latest_batch()
    wait_until(lambda: in_flight(proxy, imgs), 60, "the big blob in flight")
    assert w.proc is not None
    pool = children(w.proc.pid)
    assert len(pool) == 1, pool
    os.kill(pool[0], signal.SIGKILL)
    killed_at = time.monotonic()

    code, out, err = wait_proc(run, 120)
    took = time.monotonic() - killed_at
    print(f"\nrequeue after SIGKILL of a pool process: done {took:.1f} s later")
    assert code == 0, out + err
    assert_mirrored(dst, imgs)
    assert took < 60
    assert w.proc.poll() is None, "the worker itself must survive its pool process"
    assert proxy.count("GET", f"/blobs/{big_layer(imgs)}", status=200) >= 2
    assert "WorkerLostError" in w.log()


def slow_manifests(proxy: FaultProxy, seconds: float) -> None:
    """Every manifest GET takes a while, so a batch of small images is still running when a fault hits."""
    proxy.add_rule(Rule(delay(seconds), method="GET", path_re=r"/small/[^/]+/manifests/"))


@pytest.mark.measure
def test_broker_restart_mid_batch_loses_nothing(
        make_cluster: Callable[..., Cluster], src: Registry, dst: Registry, src_pusher: Pusher,
        make_fault_proxy: Callable[[str], FaultProxy]) -> None:
    c = make_cluster(appendonly=True, FERRY_VISIBILITY_TIMEOUT="15")
    for n in ("a", "b"):
        c.start_worker(f"node-{n}", concurrency=1)
    imgs = corpus(src_pusher, n_small=8)
    proxy = make_fault_proxy(src.host)
    stalled_big_blob(proxy, imgs, 6)
    slow_manifests(proxy, 0.7)
    listing = c.listing(lines_for(proxy.host, imgs))
    run = c.producer_bg("enqueue", str(listing), "--target", f"{dst.host}/mirror", "--wait", "--timeout", "90")
    batch = c.latest_batch()
    wait_until(lambda: len(c.hash(batch, "results")) >= 2, 60, "two images done")
    done_before = len(c.hash(batch, "results"))
    assert done_before < len(imgs), "the batch finished before the broker could be killed"

    c.redis.kill()
    time.sleep(3)
    c.redis.start()  # same port, same AOF
    restarted_at = time.monotonic()

    code, out, err = wait_proc(run, 120)
    recovered = time.monotonic() - restarted_at
    print(f"\nREADME (Redis restart): the batch finished {recovered:.1f} s after Redis came back "
          f"({len(imgs) - done_before} of {len(imgs)} images still to copy at the kill)")
    assert code == 0, out + err
    # A message a worker was taking as Redis died is lost by the transport; the wait re-sends it.
    assert recovered < RESTART_BOUND + (RESEND_BOUND if "re-sent line" in err else 0), err
    assert_mirrored(dst, imgs)
    results = c.results(batch)
    assert len(results) == len(imgs) and all(r["status"] == "synced" for r in results.values())
    for w in c.workers:
        assert w.proc is not None and w.proc.poll() is None, f"{w.node} did not survive the broker restart"
    # Reconnecting is routine: no notice from Celery about what it may do in a later version.
    assert "CPendingDeprecationWarning" not in c.logs()


PUBLISH = """
import json, sys
from config.jobs import SyncJob
from config.settings import FerrySettings
from contract.redis_client import redis_client
from contract.wire import TaskPublisher
from producer.enqueue import publish
r = redis_client(FerrySettings().broker_url.get_secret_value())
publish(TaskPublisher(r), [(t, SyncJob.model_validate(j)) for t, j in json.loads(sys.argv[1])])
r.close()
"""


def publish_raw(c: Cluster, tasks: list[tuple[str, dict[str, Any]]]) -> None:
    r = subprocess.run([sys.executable, "-c", PUBLISH, json.dumps(tasks)], cwd=ROOT, env=c.env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_duplicate_and_overlapping_deliveries_are_harmless(
        make_cluster: Callable[..., Cluster], src: Registry, dst: Registry, src_pusher: Pusher,
        make_fault_proxy: Callable[[str], FaultProxy]) -> None:
    # The big image outlives a 4 s visibility timeout, so Redis hands it to the second worker
    # while the first is still copying: the same task runs twice at once.
    c = make_cluster(FERRY_VISIBILITY_TIMEOUT="4")
    for n in ("a", "b"):
        c.start_worker(f"node-{n}", concurrency=1)
    imgs = corpus(src_pusher, n_small=3)
    proxy = make_fault_proxy(src.host)
    stalled_big_blob(proxy, imgs, 12)
    listing = c.listing(lines_for(proxy.host, imgs))
    run = c.producer_bg("enqueue", str(listing), "--target", f"{dst.host}/mirror", "--wait", "--timeout", "120")
    batch = c.latest_batch()
    m = meta(c, batch)
    small = [(t, j) for t, j in zip(m["task_ids"], m["jobs"], strict=True) if "/small/" in j["source"]]
    # The same message again (same id), and the same payload under a foreign id.
    publish_raw(c, [small[0], small[0], (str(uuid.uuid4()), small[1][1])])

    code, out, err = wait_proc(run, 120)
    assert code == 0, out + err
    assert_mirrored(dst, imgs)
    big = task_of(c, batch, "big/b")
    received = [line for line in c.logs().splitlines() if f"[{big}] received" in line]
    assert len(received) >= 2, "the long task was not delivered twice"
    assert c.results(batch)[big]["status"] == "synced"  # the second run's "up to date" does not replace it
    report = c.producer("report", batch, "--json", "-")
    assert report.returncode == 0, report.stdout + report.stderr
    doc = json.loads(report.stdout)
    assert doc["summary"]["synced"] + doc["summary"]["up_to_date"] == len(imgs)
    assert doc["summary"]["failed"] == 0
    assert sorted(i["source"] for i in doc["images"]) == sorted(j["source"] for j in m["jobs"])
    # The destination holds exactly the source's layer, byte for byte.
    for d in imgs["big/b"].blobs:
        assert dst.has_blob("mirror/big/b", d)


def test_a_task_message_the_broker_lost_is_sent_again(
        make_cluster: Callable[..., Cluster], src: Registry, dst: Registry, src_pusher: Pusher) -> None:
    """kombu's Redis transport drops a message popped by a worker whose Redis dies before the message
    is recorded as delivered. The same loss, made by taking a message off the queue: the waiting
    producer finds the task without message, state or result, and sends it again."""
    c = make_cluster()
    imgs = {f"small/s{i}": push_image(src_pusher, f"small/s{i}", layers=1, layer_size=4096) for i in range(3)}
    lines = lines_for(src.host, imgs)
    run = c.producer_bg("enqueue", str(c.listing(lines)), "--target", f"{dst.host}/mirror", "--wait",
                        "--timeout", "120")
    batch = c.latest_batch()
    with c.redis.client() as r:
        wait_until(lambda: r.llen("ferry") == len(imgs), 30, "every task queued")
        taken = r.rpop("ferry")  # the next message a worker would take
    assert taken is not None
    lost = json.loads(taken)["headers"]["id"]
    c.start_worker("node-a", concurrency=2)
    started = time.monotonic()
    code, out, err = wait_proc(run, 150)
    took = time.monotonic() - started
    assert code == 0, out + err
    assert_mirrored(dst, imgs)
    results = c.results(batch)
    assert set(results) >= {lost} and all(r["status"] == "synced" for r in results.values())
    source, line = results[lost]["source"], results[lost]["line"]
    assert source == lines[line - 1]
    assert f"re-sent line {line}: {source}: its task message was lost by the broker" in err, err
    assert err.count("re-sent line") == 1, err
    assert took < RESEND_BOUND + 10, (took, err)
