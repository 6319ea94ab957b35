"""Load: 1,000 tiny images through two real workers; enqueue time, broker memory and worker RSS."""

from __future__ import annotations

import json
import os
import resource
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.cluster import Cluster, make_cluster_fixture, process_tree, tree_rss  # noqa: F401  (fixture)
from tests.support.images import Pusher, push_image
from tests.support.procs import wait_until
from tests.support.registry import Registry

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.measure]

IMAGES = 1000
REPOS = 10  # each tag is its own task; repositories share nothing but the generator's speed
# The README's load figures that do not follow the machine's load (wall times do: printed only).
ENQUEUE_CPU_S = 2.5  # the whole producer run for 1,000 tasks
SYNC_CPU_MS_PER_IMAGE = 30.0  # both workers' process trees
REDIS_PEAK_MIB = 12.0
WORKERS_RSS_MIB = 1024.0
# What a batch leaves in Redis once done (its records until the result TTL), per 10,000 images.
REDIS_PER_10K_MIB = 16.0


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process tree: its live processes, and the children its processes reaped."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return total / tick


@pytest.mark.parametrize("pool,concurrency", [("prefork", 4), ("threads", 16)])
def test_thousand_images(make_cluster: Callable[..., Cluster], src: Registry, dst: Registry,
                         src_pusher: Pusher, pool: str, concurrency: int) -> None:
    lines: list[str] = []
    digests: dict[str, str] = {}
    for r in range(REPOS):
        img = push_image(src_pusher, f"load/r{r}", "t0", layers=1, layer_size=1024, salt=f"l{r}")
        body = src_pusher.client.get(f"{src.url}/v2/load/r{r}/manifests/t0",
                                     headers={"Accept": img.media_type}).content
        for t in range(IMAGES // REPOS):
            if t:
                src_pusher.manifest(f"load/r{r}", f"t{t}", body, img.media_type)
            lines.append(f"{src.host}/load/r{r}:t{t}")
            digests[f"load/r{r}:t{t}"] = img.digest
    c = make_cluster()
    listing = c.listing(lines)

    t0, cpu0 = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    r = c.producer("enqueue", str(listing), "--target", f"{dst.host}/mirror")
    enqueue_s = time.monotonic() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    enqueue_cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
    assert r.returncode == 0, r.stdout + r.stderr
    batch = r.stdout.strip()

    workers = [c.start_worker(f"n{i}", concurrency=concurrency, FERRY_POOL=pool) for i in range(2)]
    in_flight = 2 * concurrency
    peak_rss = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak_rss[0] = max(peak_rss[0], sum(tree_rss(w.proc.pid) for w in workers if w.proc))
            done.wait(0.5)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t1 = time.monotonic()
    busy0 = sum(tree_cpu(w.proc.pid) for w in workers if w.proc)
    try:
        wait_until(lambda: len(c.hash(batch, "results")) >= IMAGES, 300, "1,000 results")
    finally:
        done.set()
        sampler.join()
    sync_s = time.monotonic() - t1
    sync_cpu = sum(tree_cpu(w.proc.pid) for w in workers if w.proc) - busy0

    report = c.producer("report", batch, "--json", "-")
    assert report.returncode == 0, report.stdout[-2000:] + report.stderr
    doc = json.loads(report.stdout)
    assert doc["summary"]["synced"] + doc["summary"]["up_to_date"] == IMAGES
    for ref in ("load/r0:t0", "load/r9:t99", "load/r5:t50"):
        repo, tag = ref.split(":")
        assert dst.manifest_digest(f"mirror/{repo}", tag) == digests[ref]
    with c.redis.client() as rc:
        mem = rc.info("memory")
    peak = int(mem["used_memory_peak"])
    # The batch's own records (they stay until the result TTL), counted key by key: Redis's used_memory
    # also moves with the workers' connections and buffers, which do not grow with the batch.
    with c.redis.client() as rc:
        records = sum(int(rc.memory_usage(k, samples=0) or 0) for k in rc.scan_iter(f"ferry:batch:{batch}:*"))
    per_10k = records * 10_000 / IMAGES
    print(f"\nREADME (load, --pool {pool}): enqueue of {IMAGES} tasks {enqueue_s:.2f} s ({enqueue_cpu:.2f} s of "
          f"CPU, the whole producer run); synced in {sync_s:.1f} s by 2 workers x {concurrency} "
          f"({IMAGES / sync_s:.0f} images/s, {IMAGES / sync_s / 2:.0f} per worker, "
          f"{1000 * sync_cpu / IMAGES:.0f} ms of worker CPU per image); Redis used_memory_peak "
          f"{peak / 2**20:.1f} MiB; worker RSS peak (both trees) {peak_rss[0] / 2**20:.0f} MiB; "
          f"{peak_rss[0] / in_flight / 2**20:.0f} MiB per image in flight; Redis per 10,000 images once done "
          f"{per_10k / 2**20:.1f} MiB")
    assert enqueue_cpu < ENQUEUE_CPU_S
    assert 1000 * sync_cpu / IMAGES < SYNC_CPU_MS_PER_IMAGE
    assert peak < REDIS_PEAK_MIB * 2**20
    assert 0 < per_10k < REDIS_PER_10K_MIB * 2**20
    # prefork: 10 processes (two workers, four pool children each); threads: 2 processes.
    assert 0 < peak_rss[0] < WORKERS_RSS_MIB * 2**20
