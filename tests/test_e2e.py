"""The whole system: producer -> real Redis -> real Celery worker processes -> real registries."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.images import Image, Pusher, push_image
from tests.support.redis import RedisServer
from tests.support.registry import Registry
from tests.support.workers import Worker, ferry_env, run_producer

pytestmark = pytest.mark.slow


def corpus(src: Registry, pusher: Pusher) -> tuple[list[str], dict[str, Image]]:
    """Ten images: shared bases, multi-arch, a digest pin, an explicit destination."""
    imgs: dict[str, Image] = {}
    for i in range(4):
        imgs[f"apps/app{i}"] = push_image(pusher, f"apps/app{i}", layers=3, base=2, layer_size=96 * 1024,
                                          oci=False)
    for i in range(2):
        imgs[f"multi/m{i}"] = push_image(pusher, f"multi/m{i}", archs=("amd64", "arm64"), layers=2)
    for i in range(2):
        imgs[f"tiny/t{i}"] = push_image(pusher, f"tiny/t{i}", layers=1, layer_size=4096)
    imgs["pinned/p"] = push_image(pusher, "pinned/p", layers=1)
    imgs["explicit/e"] = push_image(pusher, "explicit/e", layers=1)
    h = src.host
    lines = ["# ten images", ""]
    lines += [f"{h}/apps/app{i}:v1" for i in range(4)]
    lines += [f"{h}/multi/m{i}:v1   # multi-arch" for i in range(2)]
    lines += [f"{h}/tiny/t{i}:v1" for i in range(2)]
    lines += [f"{h}/pinned/p@{imgs['pinned/p'].digest}"]
    lines += [f"{h}/explicit/e:v1 {{dst}}/elsewhere/e:v1"]
    return lines, imgs


def blob_gets(reg: Registry) -> int:
    return len(re.findall(r'"GET /v2/[^ ]+/blobs/sha256:', reg.log()))


@pytest.fixture
def cluster(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[RedisServer, list[Worker]]]:
    env = ferry_env(redis_server.url, tmp_path)
    workers = [Worker(f"node{i}", env, tmp_path / f"worker{i}.log") for i in range(2)]
    with redis_server.client() as broker:
        for w in workers:
            w.start(broker)
    yield redis_server, workers
    for w in workers:
        w.stop()


def check_destination(dst: Registry, imgs: dict[str, Image]) -> None:
    for repo, img in imgs.items():
        if repo == "explicit/e":
            assert dst.manifest_digest("elsewhere/e", "v1") == img.digest
        elif repo == "pinned/p":
            assert dst.manifest_digest(f"mirror/{repo}", img.digest) == img.digest
        else:
            assert dst.manifest_digest(f"mirror/{repo}", "v1") == img.digest, repo


def test_cluster_sync_then_nothing_to_do(tmp_path: Path, src: Registry, dst: Registry, src_pusher: Pusher,
                                         cluster: tuple[RedisServer, list[Worker]]) -> None:
    redis_server, _ = cluster
    lines, imgs = corpus(src, src_pusher)
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join(lines).replace("{dst}", dst.host) + "\n")
    env = ferry_env(redis_server.url, tmp_path)
    report = tmp_path / "report.json"

    first = run_producer(["enqueue", str(listing), "--target", f"{dst.host}/mirror", "--wait",
                          "--json", str(report)], env)
    assert first.returncode == 0, first.stdout + first.stderr
    check_destination(dst, imgs)
    doc = json.loads(report.read_text())
    assert doc["summary"]["synced"] == 10 and doc["summary"]["failed"] == 0
    # Both nodes took part. A copy to one destination streams registry to registry, leaving nothing on
    # the node: no cleanup follows it (tests/test_nodes.py follows the cleanups of copies that used the
    # node cache to the node of their sync).
    nodes = {i["node"] for i in doc["images"]}
    assert nodes == {"node0", "node1"}
    assert all(len(i["destinations"]) == 1 and not i.get("cleanup_task_id") for i in doc["images"])
    assert doc["cleanups"] == [] and doc["summary"]["cleanups_expected"] == 0

    gets_before = blob_gets(src)
    second = run_producer(["enqueue", str(listing), "--target", f"{dst.host}/mirror", "--wait",
                           "--json", str(report)], env)
    assert second.returncode == 0, second.stdout + second.stderr
    doc = json.loads(report.read_text())
    assert doc["summary"]["up_to_date"] == 10, doc["summary"]
    assert doc["summary"]["bytes"] == 0
    assert blob_gets(src) == gets_before
    assert "already up to date" in second.stdout


def test_standalone_run_needs_no_cluster(tmp_path: Path, src: Registry, dst: Registry,
                                         src_pusher: Pusher) -> None:
    lines, imgs = corpus(src, src_pusher)
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join(lines).replace("{dst}", dst.host) + "\n")
    r = run_producer(["enqueue", str(listing), "--target", f"{dst.host}/mirror", "--wait"],
                     ferry_env(None, tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "standalone" in r.stderr
    check_destination(dst, imgs)


def test_invalid_list_enqueues_nothing(tmp_path: Path, redis_server: RedisServer) -> None:
    listing = tmp_path / "bad.txt"
    listing.write_bytes(b"nginx\n--platform=linux/arm64 \nUPPER/Case:1\n--frobnicate x\nredis:7\n\xff\xfe\n")
    r = run_producer(["enqueue", str(listing), "--target", "127.0.0.1:5999/m"],
                     ferry_env(redis_server.url, tmp_path))
    assert r.returncode == 2, r.stdout + r.stderr
    for line in (2, 3, 4, 6):
        assert f"bad.txt:{line}:" in r.stderr
    assert "nothing was enqueued" in r.stderr
    with redis_server.client() as c:
        assert c.keys("*") == []
