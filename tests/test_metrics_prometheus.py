"""A real Prometheus scrapes two real workers during real batches; what it stores must equal what the
batches report, what the registry's proxy saw, and what the cluster looked like.

Prometheus scrapes every second and loads deploy/prometheus/alerts.yml; the source registry sits
behind the fault proxy, which counts every request by status and answers two of them 429.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.cluster import Cluster, children, make_cluster_fixture, wait_proc  # noqa: F401  (fixture)
from tests.support.faultproxy import FaultProxy, Rule, stall, too_many_requests
from tests.support.images import Image, Pusher, push_image
from tests.support.procs import free_port, wait_until
from tests.support.prometheus import ALERTS, Prometheus, dashboard_exprs
from tests.support.registry import Registry
from workers.metrics.families import FAMILIES

pytestmark = pytest.mark.metrics

USER, PASSWORD = "metrics-robot", "s3cret-never-in-a-label"


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[[list[int]], Prometheus]]:
    started: list[Prometheus] = []

    def start(ports: list[int]) -> Prometheus:
        p = Prometheus(tmp_path / "prometheus", [f"127.0.0.1:{port}" for port in ports], rule_files=[ALERTS])
        started.append(p.start())
        return p

    yield start
    for p in started:
        p.stop()


def report(c: Cluster, batch: str, images: int) -> dict[str, Any]:
    """The batch's report once every image has its result and every cleanup a result names (only syncs
    that used the node's disk chain one) has recorded what it freed."""

    def settled() -> bool:
        results = c.results(batch)
        chained = {r["cleanup_task_id"] for r in results.values() if r.get("cleanup_task_id")}
        return len(results) >= images and chained <= c.hash(batch, "cleanups").keys()

    wait_until(settled, 60, f"results and cleanups of {batch}")
    path = c.tmp / f"report-{batch}.json"
    r = c.producer("report", batch, "--json", str(path))
    assert r.returncode in (0, 1), r.stdout + r.stderr
    return dict(json.loads(path.read_text()))


def enqueue(c: Cluster, lines: list[str], name: str, dst: Registry) -> str:
    listing = c.listing(lines, name)
    out = c.tmp / f"{name}.json"
    r = c.producer("enqueue", str(listing), "--target", f"{dst.host}/mirror", "--target", f"{dst.host}/copy",
                   "--wait", "--json", str(out))
    assert r.returncode == 1, r.stdout + r.stderr  # one image of each batch does not exist
    return str(json.loads(out.read_text())["batch_id"])


def expected_from(reports: list[dict[str, Any]]) -> dict[str, Any]:
    images = [i for r in reports for i in r["images"]]
    dests = [d for i in images for d in i["destinations"]]
    return {
        "images": dict(Counter(i["status"] for i in images)),
        "durations": len(images),
        "bytes_transferred": sum(r["summary"]["bytes"] for r in reports),
        "bytes_downloaded": sum(i["bytes_downloaded"] for i in images),
        "blobs": {a: sum(d[f"blobs_{a}"] for d in dests) for a in ("copied", "mounted", "skipped")},
        "freed": sum(r["summary"]["freed_bytes"] for r in reports),
    }


def observed(prom: Prometheus) -> dict[str, Any]:
    def total(expr: str) -> int:
        return int(prom.scalar(f"sum({expr})") or 0)

    return {
        "images": {k: int(v) for k, v in prom.by("sum by (result) (ferry_images_total)", "result").items()},
        "durations": total("ferry_image_duration_seconds_count"),
        "bytes_transferred": total("ferry_bytes_transferred_total"),
        "bytes_downloaded": total("ferry_bytes_downloaded_total"),
        "blobs": {k: int(v) for k, v in prom.by("sum by (action) (ferry_blobs_total)", "action").items()},
        "freed": total("ferry_cleanup_freed_bytes_total"),
    }


def requests_seen(proxy: FaultProxy) -> dict[str, int]:
    return {str(code) if code else "none": n for code, n in Counter(s.status for s in proxy.requests).items()}


def scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text


def sample(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def wait_equal(get: Callable[[], Any], want: Any, what: str, timeout: float = 30) -> None:
    seen: list[Any] = [None]

    def same() -> bool:
        seen[0] = get()
        return bool(seen[0] == want)

    try:
        wait_until(same, timeout, what)
    except TimeoutError:
        assert seen[0] == want, what


def test_prometheus_sees_what_the_batches_report(
        make_cluster: Callable[..., Cluster], src: Registry, dst: Registry, src_pusher: Pusher,
        make_fault_proxy: Callable[[str], FaultProxy],
        prometheus_for: Callable[[list[int]], Prometheus]) -> None:
    imgs: dict[str, Image] = {f"apps/a{i}": push_image(src_pusher, f"apps/a{i}", layers=3, base=2) for i in range(3)}
    imgs["apps/b"] = push_image(src_pusher, "apps/b", layers=3, base=2)
    imgs["apps/slow"] = push_image(src_pusher, "apps/slow", layers=1, layer_size=1024 * 1024)
    proxy = make_fault_proxy(src.host)
    line = {repo: f"{proxy.host}/{repo}:v1" for repo in imgs}
    missing = f"{proxy.host}/apps/missing:v1"

    ports = {"m-a": free_port(), "m-b": free_port()}
    prom = prometheus_for(list(ports.values()))
    c = make_cluster(FERRY_CLEANUP_INTERVAL="0", FERRY_CACHE__KEEP_DURATION="0",
                     FERRY_REGISTRIES=json.dumps({dst.host: {"username": USER, "password": PASSWORD}}))
    for node, port in ports.items():
        c.start_worker(node, concurrency=2, FERRY_METRICS_PORT=str(port), FERRY_METRICS_DIR=str(c.tmp / node))
    wait_equal(lambda: prom.scalar('sum(up{job="ferry"})'), 2.0, "both workers scraped")
    started = time.time()

    # Two 429s: each pauses the registry for the cluster (Retry-After: 1) and is retried once.
    proxy.add_rule(Rule(too_many_requests("1"), path_re="/manifests/", times=2))
    first = enqueue(c, [line["apps/a0"], line["apps/a1"], line["apps/a2"], missing], "first", dst)
    # Again, one image more: the rest is already up to date.
    second = enqueue(c, [line["apps/a0"], line["apps/a1"], line["apps/a2"], line["apps/b"], missing],
                     "second", dst)
    reports = [report(c, first, 4), report(c, second, 5)]
    want = expected_from(reports)
    assert set(want["images"]) == {"synced", "up_to_date", "failed"} and want["blobs"]["copied"] > 0, want
    proxy.wait_idle()
    print(f"\nreported: {want}\nrequests at the source: {requests_seen(proxy)}")

    # Counters equal the reports, and the proxy's own count of requests by status.
    wait_equal(lambda: observed(prom), want, "Prometheus's counters equal the batch reports")
    registry = f'registry="{proxy.host}"'
    wait_equal(lambda: {k: int(v) for k, v in prom.by(
        f"sum by (code) (ferry_registry_requests_total{{{registry}}})", "code").items()},
        requests_seen(proxy), "requests by status equal what the proxy saw")
    assert requests_seen(proxy)["429"] == 2
    assert prom.scalar('sum(ferry_retries_total{level="request"})') == 2
    assert prom.scalar('sum(ferry_retries_total{level="image"})') == 0
    assert prom.scalar(f"sum(ferry_quota_pauses_total{{{registry}}})") == 2
    pause_end = prom.scalar(f"max(ferry_quota_pause_end_timestamp_seconds{{{registry}}})")
    assert pause_end is not None and started < pause_end < time.time() + 5

    # Cluster gauges: exported by exactly one worker all along, and right.
    assert prom.scalar("count(ferry_workers_online)") == 1
    assert prom.scalar("max(ferry_workers_online)") == 2
    assert prom.scalar("max_over_time(count(ferry_workers_online)[10m:1s])") == 1
    queues = prom.by("max by (queue) (ferry_queue_length)", "queue")
    assert queues == {"ferry": 0, "ferry.node.m-a": 0, "ferry.node.m-b": 0}
    assert prom.scalar("max_over_time(max(ferry_batches_running)[10m:1s])") >= 1  # type: ignore[operator]
    assert prom.scalar("max(ferry_batches_running)") == 0
    assert prom.scalar("max_over_time(sum(ferry_images_in_flight)[10m:1s])") >= 1  # type: ignore[operator]
    assert prom.scalar("sum(ferry_images_in_flight)") == 0
    assert set(prom.by("ferry_cache_bytes", "node")) == set(ports)

    # Everything ferry exports is there; the dashboard's queries and the alert rules all evaluate.
    names = set(prom.by('count by (__name__) ({__name__=~"ferry_.*"})', "__name__"))
    assert names == {n for f in FAMILIES for n in f.series_names()}
    for expr in dashboard_exprs():
        assert prom.query(expr), f"dashboard query answers nothing: {expr}"
    rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    assert len(rules) == 4 and all(r["health"] == "ok" for r in rules), rules

    def firing() -> set[str]:
        return {a["labels"]["alertname"] for a in prom.api("alerts")["alerts"] if a["state"] == "firing"}

    wait_until(lambda: "FerryImagesFailed" in firing(), 15, "the failures alert")
    assert "FerryNoWorkerOnline" not in firing()

    # Labels carry hosts, outcomes and names: no credentials, tags or digests.
    series = prom.api("series", **{"match[]": '{__name__=~"ferry_.*"}'})
    values = {v for s in series for k, v in s.items() if k != "__name__"}
    for secret in (USER, PASSWORD, "sha256", "v1", "apps/"):
        assert not [v for v in values if secret in v], secret
    for port in ports.values():
        assert PASSWORD not in scrape(port)

    # A pool process killed mid-copy: its image is no longer in flight, its earlier counts stay.
    done = sum(want["images"].values())
    proxy.add_rule(Rule(stall(120, after=256 * 1024), method="GET",
                        path_re=f"/apps/slow/blobs/{imgs['apps/slow'].blobs[1]}", times=1))
    listing = c.listing([line["apps/slow"]], "slow.txt")
    run = c.producer_bg("enqueue", str(listing), "--target", f"{dst.host}/mirror", "--wait", "--timeout", "120")
    busy: list[str] = []
    wait_until(lambda: bool(busy.extend(n for n, p in ports.items() if sample(scrape(p), "ferry_images_in_flight"))
                            or busy), 60, "the slow image in flight")
    worker = c.worker(busy[0])
    assert worker.proc is not None
    for pid in children(worker.proc.pid):
        os.kill(pid, signal.SIGKILL)
    code, out, err = wait_proc(run, 120)
    assert code == 0, out + err
    wait_equal(lambda: prom.scalar("sum(ferry_images_total)"), float(done + 1), "every image counted once")
    wait_equal(lambda: prom.scalar("sum(ferry_images_in_flight)"), 0.0, "nothing left in flight")

    # The exporting worker dies: the other takes over, and counts one worker online.
    exporter = prom.query("ferry_workers_online")[0]["metric"]["instance"]
    victim = next(n for n, p in ports.items() if exporter.endswith(f":{p}"))
    c.worker(victim).kill()
    killed = time.monotonic()
    survivor = next(f"127.0.0.1:{p}" for n, p in ports.items() if n != victim)
    wait_equal(lambda: prom.by("ferry_workers_online", "instance"), {survivor: 1.0},
               "the survivor exports the cluster gauges", timeout=120)
    print(f"\ncluster gauges back from the other worker {time.monotonic() - killed:.0f} s after the kill")
    assert prom.scalar("max_over_time(count(ferry_workers_online)[10m:1s])") == 1
