"""Per-node work through the whole system: blob cache per node, chained cleanup, the docker engine."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.dockerd import Dockerd
from tests.support.faultproxy import FaultProxy
from tests.support.images import Pusher, push_image
from tests.support.procs import wait_until
from tests.support.redis import RedisServer
from tests.support.registry import Registry
from tests.support.workers import Worker, ferry_env, run_producer

pytestmark = pytest.mark.slow
BLOB_GET = re.compile(r"/v2/(?P<repo>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$")


def start_workers(tmp_path: Path, redis_server: RedisServer, n: int = 2, **env: str) -> list[Worker]:
    workers = []
    with redis_server.client() as broker:
        for i in range(n):
            # Separate cache directories, as on separate machines.
            wenv = ferry_env(redis_server.url, tmp_path / f"node{i}", **env)
            workers.append(Worker(f"node{i}", wenv, tmp_path / f"worker{i}.log").start(broker))
    return workers


def wait_for_cleanups(redis_server: RedisServer, batch: str, n: int) -> None:
    """Chained cleanups run after their syncs, so they may finish after ``--wait`` returns."""
    with redis_server.client() as c:
        wait_until(lambda: c.hlen(f"ferry:batch:{batch}:cleanups") >= n, 60, f"{n} chained cleanups")


def test_two_targets_download_each_blob_once_per_node(
    tmp_path: Path, src: Registry, make_registry: Callable[..., Registry], src_pusher: Pusher,
    redis_server: RedisServer, make_fault_proxy: Callable[[str], FaultProxy],
) -> None:
    dst_a, dst_b = make_registry("dst-a"), make_registry("dst-b")
    for i in range(6):
        push_image(src_pusher, f"apps/a{i}", layers=3, base=2, layer_size=256 * 1024, oci=False)
    for i in range(4):
        push_image(src_pusher, f"multi/m{i}", archs=("amd64", "arm64"), layers=2, layer_size=128 * 1024)
    proxy = make_fault_proxy(src.host)
    listing = tmp_path / "images.txt"
    listing.write_text("".join(f"{proxy.host}/apps/a{i}:v1\n" for i in range(6))
                       + "".join(f"{proxy.host}/multi/m{i}:v1\n" for i in range(4)))
    workers = start_workers(tmp_path, redis_server)
    env = ferry_env(redis_server.url, tmp_path)
    try:
        r = run_producer(["enqueue", str(listing), "--target", f"{dst_a.host}/a", "--target", f"{dst_b.host}/b",
                          "--wait", "--json", "-"], env)
        assert r.returncode == 0, r.stdout + r.stderr
        batch = json.loads(r.stdout[r.stdout.index("{"):])["batch_id"]
        wait_for_cleanups(redis_server, batch, 10)
        # status shows the cleanups as they land: here, all of them.
        st = run_producer(["status", batch, "--json", "-"], env)
        assert st.returncode == 0, st.stdout + st.stderr
        status = json.loads(st.stdout)
        assert status["cleanups_done"] == status["cleanups_expected"] == 10
        r = run_producer(["report", batch, "--json", "-"], env)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        for w in workers:
            w.stop()
    doc = json.loads(r.stdout)
    images = doc["images"]
    assert len(images) == 10 and all(len(i["destinations"]) == 2 for i in images)
    for i in range(6):
        digest = src.manifest_digest(f"apps/a{i}", "v1")
        assert dst_a.manifest_digest(f"a/apps/a{i}", "v1") == digest
        assert dst_b.manifest_digest(f"b/apps/a{i}", "v1") == digest

    # Which node fetched what, counted at the proxy in front of the source.
    node_of_repo = {i["source"].split("/", 1)[1].rsplit(":", 1)[0]: i["node"] for i in images}
    fetches: Counter[tuple[str, str]] = Counter()
    proxy.wait_idle()
    for seen in proxy.select(method="GET"):
        m = BLOB_GET.match(seen.path)
        if m:
            fetches[(node_of_repo[m["repo"]], m["digest"])] += 1
    assert fetches, "no blob was fetched from the source"
    repeated = {k: n for k, n in fetches.items() if n > 1}
    assert not repeated, f"blobs fetched more than once on one node: {repeated}"

    # Every chained cleanup ran on the node of the sync it followed.
    by_task = {i["task_id"]: i["node"] for i in images}
    cleanups = [c for c in doc["cleanups"] if c["for_task"] in by_task]
    assert {c["for_task"] for c in cleanups} == set(by_task)
    assert all(c["node"] == by_task[c["for_task"]] for c in cleanups)


@pytest.mark.docker
def test_docker_engine_batch_leaves_nothing_in_the_daemon(
    tmp_path: Path, src: Registry, dst: Registry, src_pusher: Pusher, redis_server: RedisServer,
    dockerd: Dockerd,
) -> None:
    for i in range(4):
        push_image(src_pusher, f"apps/d{i}", layers=2, layer_size=64 * 1024, oci=False)
    push_image(src_pusher, "multi/dm", archs=("amd64", "arm64"), layers=1, layer_size=32 * 1024, oci=False)
    listing = tmp_path / "images.txt"
    listing.write_text("".join(f"{src.host}/apps/d{i}:v1\n" for i in range(4))
                       + f"--platform=linux/arm64 {src.host}/multi/dm:v1\n")
    workers = start_workers(tmp_path, redis_server, FERRY_DOCKER_HOST=dockerd.host)
    try:
        report = tmp_path / "report.json"
        r = run_producer(["enqueue", str(listing), "--target", f"{dst.host}/m", "--engine", "docker", "--wait",
                          "--json", str(report)], ferry_env(redis_server.url, tmp_path))
        assert r.returncode == 0, r.stdout + r.stderr
        doc = json.loads(report.read_text())
        assert doc["summary"]["synced"] == 5
        # The docker path re-compresses and keeps one platform: the report must say so.
        assert all(d["digest_changed"] for i in doc["images"] for d in i["destinations"])
        for i in range(4):
            assert dst.manifest_digest(f"m/apps/d{i}", "v1") is not None
        assert dst.manifest_digest("m/multi/dm", "v1") is not None
        wait_for_cleanups(redis_server, doc["batch_id"], 5)
    finally:
        for w in workers:
            w.stop()
    client = dockerd.client()
    try:
        left = [t for img in client.images.list(all=True) for t in img.tags
                if t.startswith((src.host, dst.host))]
    finally:
        client.close()
    assert left == [], f"the daemon still holds {left}"
