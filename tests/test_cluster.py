"""Cluster coordination end to end: real Redis, real worker processes, real registries.

Every count is taken at a FaultProxy in front of a registry, never from ferry's logs.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from config.describe import cleanup_task_name
from config.jobs import SyncJob
from contract import keys
from tests.support.cluster import Cluster, make_cluster_fixture, wait_proc  # noqa: F401  (fixture)
from tests.support.faultproxy import FaultProxy, Rule, add_headers, delay, status, too_many_requests
from tests.support.images import Image, Pusher, push_image
from tests.support.procs import holds_for, wait_until
from tests.support.redis import RedisServer
from tests.support.registry import Registry
from tests.support.tokenserver import TokenServer
from workers.cluster.coordinator import RedisCoordinator
from workers.engine.auth import RegistryAuth
from workers.engine.cache import BlobCache, CachePolicy
from workers.engine.keychain import Credential, StaticKeychain
from workers.engine.local_coordinator import LocalCoordinator
from workers.engine.protocols import Coordinator
from workers.engine.registry import RegistryEngine, RegistryOptions

pytestmark = pytest.mark.cluster
# Seconds a 10-image batch may take to finish once its coordination Redis is killed (README).
COORDINATION_LOSS_BOUND = 20.0

MakeProxy = Callable[[str], FaultProxy]
COMMIT = r"/blobs/uploads/.*[?&]digest=(sha256(:|%3A)[0-9a-f]{64})"


def commits(proxy: FaultProxy) -> Counter[str]:
    """Committed uploads per digest (the PUT that ends an upload, answered 201)."""
    out: Counter[str] = Counter()
    for s in proxy.select("PUT", COMMIT, status=201):
        m = re.search(COMMIT, s.path)
        assert m is not None
        out[m.group(1).replace("%3A", ":")] += 1
    return out


def run_batch(cluster: Cluster, lines: list[str], target: str, name: str = "images.txt",
              timeout: float = 180) -> dict[str, Any]:
    report = cluster.tmp / f"{name}.json"
    r = cluster.producer("enqueue", str(cluster.listing(lines, name)), "--target", target, "--wait",
                         "--json", str(report), timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr + cluster.logs()[-4000:]
    doc: dict[str, Any] = json.loads(report.read_text())
    return doc


def test_every_unique_blob_is_uploaded_once_in_the_cluster(make_cluster, src: Registry, dst: Registry,
                                                           src_pusher: Pusher,
                                                           make_fault_proxy: MakeProxy) -> None:
    imgs = [push_image(src_pusher, f"apps/a{i}", layers=3, base=2, layer_size=64 * 1024) for i in range(30)]
    proxy = make_fault_proxy(dst.host)
    cluster: Cluster = make_cluster()
    for i in range(3):
        cluster.start_worker(f"node{i}", concurrency=2)
    doc = run_batch(cluster, [f"{src.host}/{i.repo}:v1" for i in imgs], f"{proxy.host}/mirror")
    assert doc["summary"]["synced"] == 30
    proxy.wait_idle()
    unique = {b for i in imgs for b in i.blobs}
    done = commits(proxy)
    assert set(done) == unique
    assert [d for d, n in done.items() if n != 1] == []
    # Every other occurrence of a blob was mounted or skipped, never sent; the mounts the workers
    # report are the mounts the registry answered.
    dests = [d for i in doc["images"] for d in i["destinations"]]
    occurrences = sum(len(i.blobs) for i in imgs)
    assert sum(d["blobs_copied"] for d in dests) == len(unique)
    assert sum(d["blobs_mounted"] + d["blobs_skipped"] for d in dests) == occurrences - len(unique)
    assert proxy.count("POST", r"mount=", status=201) == sum(d["blobs_mounted"] for d in dests)
    assert {r["node"] for r in doc["images"]} == {"node0", "node1", "node2"}


def test_request_rate_at_a_limited_source_holds_across_workers(make_cluster, src: Registry, dst: Registry,
                                                               src_pusher: Pusher,
                                                               make_fault_proxy: MakeProxy) -> None:
    imgs = [push_image(src_pusher, f"r/i{i}", layers=4, layer_size=8 * 1024) for i in range(14)]
    sproxy = make_fault_proxy(src.host)
    limits = json.dumps({sproxy.host: {"requests_per_second": 5}})
    cluster: Cluster = make_cluster(FERRY_REGISTRIES=limits)
    for i in range(3):
        cluster.start_worker(f"node{i}", concurrency=2)
    run_batch(cluster, [f"{sproxy.host}/{i.repo}:v1" for i in imgs], f"{dst.host}/mirror")
    starts = sorted(s.start for s in sproxy.requests)
    assert len(starts) >= 14 * 6
    assert sproxy.max_rate(5.0) <= 5 * 5 * 1.1
    # Busy all along: the limit, not a lack of work, set the pace.
    steady = [t for t in starts if starts[0] + 1 <= t <= starts[-1] - 1]
    assert (len(steady) - 1) / (steady[-1] - steady[0]) >= 5 * 0.9


def test_quota_pause_stops_every_worker_until_the_reset(make_cluster, src: Registry, dst: Registry,
                                                        src_pusher: Pusher,
                                                        make_fault_proxy: MakeProxy) -> None:
    imgs = [push_image(src_pusher, f"q/i{i}", layers=2, layer_size=8 * 1024) for i in range(6)]
    sproxy = make_fault_proxy(src.host)
    cluster: Cluster = make_cluster()
    for i in range(2):
        cluster.start_worker(f"node{i}", concurrency=2)
    spent = status(429, {"RateLimit-Limit": "100;w=21600", "RateLimit-Remaining": "0;w=21600",
                         "Retry-After": "10", "Content-Type": "application/json"},
                   b'{"errors":[{"code":"TOOMANYREQUESTS","message":"pull rate limit"}]}')
    sproxy.add_rule(Rule(spent))
    first: list[float] = []

    def lift() -> None:
        wait_until(lambda: bool(sproxy.select(status=429)), 60, "the first 429")
        first.append(min(s.start for s in sproxy.select(status=429)))
        time.sleep(max(0.0, first[0] + 9.7 - time.monotonic()))
        sproxy.clear_rules()

    t = threading.Thread(target=lift)
    t.start()
    run_batch(cluster, [f"{sproxy.host}/{i.repo}:v1" for i in imgs], f"{dst.host}/mirror")
    t.join(30)
    t0 = first[0]
    during = [s for s in sproxy.requests if t0 + 0.5 < s.start < t0 + 9.9]
    assert during == []
    # Refused were only the requests already on their way when the first refusal came back.
    assert all(s.start <= t0 + 0.5 for s in sproxy.select(status=429))
    assert sproxy.count("GET", r"/blobs/", status=200) >= 6 * 3


def test_a_dead_lease_holder_is_taken_over(make_cluster, src: Registry, dst: Registry, src_pusher: Pusher,
                                           make_fault_proxy: MakeProxy) -> None:
    big = 2 * 1024 * 1024
    imgs = [push_image(src_pusher, f"d/i{i}", layers=2, base=1, layer_size=big) for i in range(2)]
    shared = imgs[0].blobs[1]
    assert shared == imgs[1].blobs[1]
    proxy = make_fault_proxy(dst.host)
    proxy.add_rule(Rule(delay(1.0), method="PATCH"))
    lease_ttl = 3.0
    cluster: Cluster = make_cluster(FERRY_COORDINATION__LEASE_TTL=str(lease_ttl), FERRY_CHUNK_SIZE="262144",
                                    FERRY_VISIBILITY_TIMEOUT="10")
    workers = [cluster.start_worker(f"node{i}", concurrency=1) for i in range(2)]
    listing = cluster.listing([f"{src.host}/{i.repo}:v1" for i in imgs])
    producer = cluster.producer_bg("enqueue", str(listing), "--target", f"{proxy.host}/mirror", "--wait")
    key = keys.blob_lease(proxy.host, shared)
    holder: list[str] = []

    def held() -> bool:
        with cluster.redis.client() as c:
            v = c.get(key)
        holder[:] = [v.decode()] if v else []
        return bool(holder)

    wait_until(held, 60, "the shared layer's upload lease")
    doomed = next(w for w in workers if holder[0].startswith(w.node + ":"))
    survivor = next(w for w in workers if w is not doomed)
    wait_until(lambda: proxy.count("PATCH") > 0, 30, "the holder's upload under way")
    doomed.kill()
    killed = time.monotonic()
    wait_until(lambda: held() and holder[0].startswith(survivor.node + ":"), lease_ttl + 5, "a new holder")
    assert time.monotonic() - killed <= lease_ttl + 1.5
    code, out, err = wait_proc(producer, 120)
    assert code == 0, out + err + cluster.logs()[-4000:]
    proxy.wait_idle()
    assert commits(proxy)[shared] == 1
    for i in imgs:
        assert dst.manifest_digest(f"mirror/{i.repo}", "v1") == i.digest


def test_pull_through_mirror_serves_the_second_node(make_cluster, make_registry: Callable[..., Registry],
                                                    src: Registry, src_pusher: Pusher,
                                                    make_fault_proxy: MakeProxy) -> None:
    # No layer shared between repositories: distribution's proxy caches blobs per repository.
    imgs = [push_image(src_pusher, f"m/i{i}", layers=2, layer_size=32 * 1024) for i in range(3)]
    origin = make_fault_proxy(src.host)
    mirror = make_registry("mirror", proxy_remote=origin.url)
    mproxy = make_fault_proxy(mirror.host)
    dst1, dst2 = make_registry("dst1"), make_registry("dst2")
    cluster: Cluster = make_cluster(FERRY_REGISTRIES=json.dumps({origin.host: {"mirrors": [mproxy.host]}}))
    lines = [f"{origin.host}/{i.repo}:v1" for i in imgs]
    first = cluster.start_worker("node0")
    run_batch(cluster, lines, f"{dst1.host}/m", "one.txt")
    first.stop()
    origin.wait_idle()
    unique = {b for i in imgs for b in i.blobs}
    fetched = {re.sub(r".*/blobs/", "", s.path) for s in origin.select("GET", r"/blobs/sha256:", status=200)}
    assert fetched == unique
    origin_before, mirror_before = origin.count("GET", r"/blobs/"), mproxy.count("GET", r"/blobs/", status=200)

    cluster.start_worker("node1")
    run_batch(cluster, lines, f"{dst2.host}/m", "two.txt")
    origin.wait_idle()
    # The second node read every blob from the mirror; the origin sent none of them again.
    assert mproxy.count("GET", r"/blobs/", status=200) - mirror_before == len(unique)
    assert origin.count("GET", r"/blobs/") == origin_before
    assert origin.count("GET", r"/blobs/", status=404) == 0
    for i in imgs:
        assert dst2.manifest_digest(f"m/{i.repo}", "v1") == i.digest


def test_origin_serves_when_the_mirror_fails(make_cluster, src: Registry, dst: Registry, src_pusher: Pusher,
                                             make_fault_proxy: MakeProxy) -> None:
    imgs = [push_image(src_pusher, f"n/i{i}", layers=1) for i in range(2)]
    broken = make_fault_proxy(src.host)
    broken.add_rule(Rule(status(404, {"Content-Type": "application/json"},
                                b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}')))
    cluster: Cluster = make_cluster(FERRY_REGISTRIES=json.dumps({src.host: {"mirrors": [broken.host]}}))
    cluster.start_worker("node0")
    run_batch(cluster, [f"{src.host}/{i.repo}:v1" for i in imgs], f"{dst.host}/mirror")
    assert broken.count(status=404) >= 2
    for i in imgs:
        assert dst.manifest_digest(f"mirror/{i.repo}", "v1") == i.digest


def test_disk_floor_pauses_intake_until_cleanup_frees_space(make_cluster, src: Registry, dst: Registry,
                                                            src_pusher: Pusher) -> None:
    imgs = [push_image(src_pusher, f"f/i{i}", layers=1) for i in range(3)]
    cache_root = Path(src.root).parent / "cache" / "node0"
    import shutil
    free = shutil.disk_usage(cache_root.parent.parent).free
    floor = free - 100 * 1024**2
    cache = BlobCache(cache_root, CachePolicy(keep_duration=0, keep_bytes=10 * 1024**3, min_free_bytes=floor))
    blob = b"\0" * (300 * 1024**2)
    digest = "sha256:" + __import__("hashlib").sha256(blob).hexdigest()
    with cache.writer(digest, len(blob)) as f:
        f.write(blob)
    del blob
    lease = cache.lease(digest)
    lease.__enter__()
    try:
        cluster: Cluster = make_cluster(FERRY_CACHE__MIN_FREE_BYTES=str(floor), FERRY_DISK_CHECK_INTERVAL="1",
                                        FERRY_CLEANUP_INTERVAL="0")
        w = cluster.start_worker("node0")
        wait_until(lambda: "taking no new images" in w.log(), 20, "the disk floor")
        listing = cluster.listing([f"{src.host}/{i.repo}:v1" for i in imgs])
        producer = cluster.producer_bg("enqueue", str(listing), "--target", f"{dst.host}/mirror", "--wait")
        with cluster.redis.client() as c:
            wait_until(lambda: c.llen("ferry") == 3, 30, "the batch on the queue")
            # Several disk checks long: queued, untouched, none failed.
            holds_for(lambda: c.llen("ferry") == 3 and not c.exists(f"ferry:batch:{cluster.latest_batch()}:results"),
                      4, "the paused node leaving the images queued")
        assert cache.get(digest) is not None
    finally:
        lease.__exit__(None, None, None)
    code, out, err = wait_proc(producer, 90)
    assert code == 0, out + err
    assert cache.get(digest) is None  # the node's cleanup freed it
    for i in imgs:
        assert dst.manifest_digest(f"mirror/{i.repo}", "v1") == i.digest


def test_periodic_cleanup_runs_on_its_own(make_cluster, tmp_path: Path) -> None:
    interval = 1
    cluster: Cluster = make_cluster(FERRY_CLEANUP_INTERVAL=str(interval), FERRY_CACHE__KEEP_DURATION="60")
    cache = BlobCache(tmp_path / "cache" / "node0", CachePolicy(keep_duration=60))
    data = b"stale" * 1000
    digest = "sha256:" + __import__("hashlib").sha256(data).hexdigest()
    with cache.writer(digest, len(data)) as f:
        f.write(data)
    path = cache.get(digest)
    assert path is not None
    os.utime(path, (time.time() - 3600, time.time() - 3600))  # unused for an hour: past keep_duration
    w = cluster.start_worker("node0")
    started = time.monotonic()
    # No sync, no chained cleanup: only the node's own timer sends ferry.cleanup.
    # Looked at by path: cache.get() would mark the blob as just used.
    wait_until(lambda: not path.exists(), 10 * interval + 10, "the periodic cleanup to expire the blob")
    # Celery logs each run as "Task cleanup node0 periodic[<id>] succeeded ...".
    periodic = re.compile(re.escape(cleanup_task_name("node0", "periodic")) + r"\[[^\]]+\] succeeded")

    def runs() -> int:
        return len(periodic.findall(w.log()))

    wait_until(lambda: runs() >= 2, 10 * interval + 10, "a second periodic cleanup")
    assert time.monotonic() - started <= runs() * interval + 10


def test_small_images_are_not_held_up_by_a_large_one(make_cluster, src: Registry, dst: Registry,
                                                     src_pusher: Pusher, make_fault_proxy: MakeProxy) -> None:
    big = push_image(src_pusher, "o/big", layers=1, layer_size=256 * 1024)
    tiny = [push_image(src_pusher, f"o/tiny{i}", layers=1, layer_size=1024) for i in range(6)]
    sproxy = make_fault_proxy(src.host)
    sproxy.add_rule(Rule(delay(8.0), method="GET", path_re=big.blobs[1]))
    dproxy = make_fault_proxy(dst.host)
    cluster: Cluster = make_cluster()
    cluster.start_worker("node0", concurrency=2)
    lines = [f"{sproxy.host}/o/big:v1", *(f"{sproxy.host}/{t.repo}:v1" for t in tiny)]
    run_batch(cluster, lines, f"{dproxy.host}/mirror")
    tagged = {re.sub(r"^/v2/mirror/(.*)/manifests/v1$", r"\1", s.path): s.end
              for s in dproxy.select("PUT", r"/manifests/v1$", status=201)}
    assert len(tagged) == 7
    assert max(tagged[t.repo] for t in tiny) < tagged["o/big"]


# -- what the ledger saves ------------------------------------------------------------------

def bench_corpus(pusher: Pusher) -> list[Image]:
    """Like the benchmark's 40 images: 20 apps on 2 shared base layers, 10 multi-arch, 10 tiny."""
    out = [push_image(pusher, f"apps/app{i}", layers=4, base=2, layer_size=32 * 1024) for i in range(20)]
    out += [push_image(pusher, f"multi/m{i}", archs=("amd64", "arm64"), layers=2, base=1, layer_size=16 * 1024)
            for i in range(10)]
    out += [push_image(pusher, f"tiny/t{i}", layers=1, layer_size=2048) for i in range(10)]
    return out


def sync_with(coordinators: list[Coordinator], src: Registry, target: str, images: list[Image]) -> None:
    engines = [RegistryEngine(RegistryOptions(blob_concurrency=4), coordinator=c) for c in coordinators]
    failures: list[str] = []

    def work(n: int) -> None:
        for img in images[n::len(engines)]:
            job = SyncJob(batch_id="b", source=f"{src.host}/{img.repo}:v1",
                          destinations=[f"{target}/{img.repo}:v1"])
            r = engines[n].sync(job, lambda _: None)
            if r.status != "synced":
                failures.append(f"{img.repo}: {r.error}")

    ts = [threading.Thread(target=work, args=(n,)) for n in range(len(engines))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(240)
    for e in engines:
        e.close()
    assert failures == []


# The README's table: (requests, blob HEADs, blob uploads) at the destination, cold and then into a
# second namespace. How many blobs two workers race to upload at once varies, hence a tolerance.
LEDGER_TABLE = {"without": [(676, 132, 132), (676, 132, 132)], "with": [(658, 130, 124), (280, 0, 0)]}
LEDGER_TOLERANCE = 0.05


@pytest.mark.measure
def test_ledger_saves_destination_requests(make_cluster, make_registry: Callable[..., Registry], src: Registry,
                                           src_pusher: Pusher, make_fault_proxy: MakeProxy,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    images = bench_corpus(src_pusher)
    cluster: Cluster = make_cluster()
    counts: dict[str, list[tuple[int, int, int]]] = {}
    for mode in ("without", "with"):
        dst = make_registry(f"dst-{mode}")
        proxy = make_fault_proxy(dst.host)
        counts[mode] = []
        # Cold copy, then the same images into a second namespace by freshly started workers.
        for namespace in ("mirror", "mirror2"):
            coords: list[Coordinator] = [LocalCoordinator() for _ in range(3)] if mode == "without" else \
                [RedisCoordinator.from_url(cluster.redis.url, owner=f"w{i}") for i in range(3)]
            proxy.reset_counts()
            sync_with(coords, src, f"{proxy.host}/{namespace}", images)
            for c in coords:
                if isinstance(c, RedisCoordinator):
                    c.close()
            proxy.wait_idle()
            counts[mode].append((proxy.count(), proxy.count("HEAD", r"/blobs/"), sum(commits(proxy).values())))
    with capsys.disabled():
        print(f"\nREADME (ledger table): destination requests / blob HEADs / blob uploads for {len(images)} "
              f"images on 3 workers, cold then into a second namespace: without ledger {counts['without']}, "
              f"with ledger {counts['with']}")
    cold_without, again_without = counts["without"]
    cold_with, again_with = counts["with"]
    assert cold_with[0] < cold_without[0] and again_with[0] < again_without[0]
    unique = len({b for i in images for b in i.blobs})
    assert cold_with[2] == unique and again_with[1:] == (0, 0)  # uploaded once; then only mounts
    for mode, runs in LEDGER_TABLE.items():
        for stated, measured in zip(runs, counts[mode], strict=True):
            for a, b in zip(stated, measured, strict=True):
                assert abs(a - b) <= LEDGER_TOLERANCE * a, (mode, stated, measured)


# -- coordination through real batches --------------------------------------------------------

def test_max_concurrency_holds_across_worker_processes(make_cluster, src: Registry, dst: Registry,
                                                       src_pusher: Pusher, make_fault_proxy: MakeProxy) -> None:
    limit = 2
    imgs = [push_image(src_pusher, f"c/i{i}", layers=2, layer_size=16 * 1024) for i in range(8)]
    sproxy = make_fault_proxy(src.host)
    sproxy.add_rule(Rule(delay(0.3), method="GET"))  # long enough requests that unlimited ones would pile up
    cluster: Cluster = make_cluster(FERRY_REGISTRIES=json.dumps({sproxy.host: {"max_concurrency": limit}}))
    for i in range(3):
        cluster.start_worker(f"node{i}", concurrency=2)  # 6 processes, each copying blobs several at a time
    doc = run_batch(cluster, [f"{sproxy.host}/{i.repo}:v1" for i in imgs], f"{dst.host}/mirror")
    assert doc["summary"]["synced"] == len(imgs)
    assert len({r["node"] for r in doc["images"]}) >= 2
    sproxy.wait_idle()
    # Measured where the registry sees them: never more at once than the limit, and the limit used.
    assert sproxy.max_in_flight() == limit


def test_quota_floor_and_reset_pause_the_cluster_through_a_batch(make_cluster, src: Registry, dst: Registry,
                                                                 src_pusher: Pusher,
                                                                 make_fault_proxy: MakeProxy) -> None:
    floor, reset = 5, 4.0
    imgs = [push_image(src_pusher, f"rl/i{i}", layers=2, layer_size=8 * 1024) for i in range(8)]
    sproxy = make_fault_proxy(src.host)
    sproxy.add_rule(Rule(delay(0.2), method="GET", path_re=r"/blobs/"))  # keep the batch busy past the notes
    # Successful answers carrying Docker Hub's quota headers: the first still above the floor, the
    # second under it, with a reset 4 s away.
    window = {"RateLimit-Limit": "100;w=21600"}
    above = sproxy.add_rule(Rule(add_headers({**window, "RateLimit-Remaining": f"{floor};w=21600"}),
                                 method="GET", path_re=r"/manifests/", times=1))
    under = sproxy.add_rule(Rule(add_headers({**window, "RateLimit-Remaining": "3;w=21600",
                                              "RateLimit-Reset": str(int(reset))}),
                                 method="GET", path_re=r"/manifests/", times=1))
    cluster: Cluster = make_cluster(FERRY_COORDINATION__QUOTA_FLOOR=str(floor))
    for i in range(2):
        cluster.start_worker(f"node{i}", concurrency=2)
    # At the floor: no pause (a pause would have lasted the 6 h window, and the batch would not end).
    doc = run_batch(cluster, [f"{sproxy.host}/{i.repo}:v1" for i in imgs], f"{dst.host}/mirror")
    assert doc["summary"]["synced"] == len(imgs) and above.hits == under.hits == 1
    sproxy.wait_idle()
    seen = sorted(sproxy.requests, key=lambda s: s.start)
    t_under = [s for s in seen if s.method == "GET" and "/manifests/" in s.path][1].end
    assert t_under is not None
    # Under it: nothing reaches the registry until the reset, from any worker (a request already on
    # its way may land within the 0.25 s a worker's view of a pause may lag).
    late = [s for s in seen if t_under + 0.5 < s.start < t_under + reset - 0.2]
    assert late == []
    assert any(t_under + reset - 0.2 <= s.start <= t_under + reset + 2.0 for s in seen)


def test_extra_credentials_from_settings_take_over_a_spent_one(make_cluster, tmp_path: Path, dst: Registry,
                                                               make_registry: Callable[..., Registry],
                                                               make_fault_proxy: MakeProxy) -> None:
    users = {"admin": "admin-pw", "first": "first-pw-Zq1", "second": "second-pw-Zq2"}
    with TokenServer(tmp_path / "tokens", users=users, acl={u: {"*": "*"} for u in users}) as ts:
        reg = make_registry("tok", token=ts.registry_token)
        admin = StaticKeychain({reg.host: Credential("admin", "admin-pw")})
        with httpx.Client(auth=RegistryAuth(reg.host, admin), timeout=30) as c:
            imgs = [push_image(Pusher(reg.url, client=c), f"lib/r{i}", layers=1) for i in range(4)]
        proxy = make_fault_proxy(reg.host)
        pause = 5.0
        # The first credential's pull quota runs out on its first blob read (sent with its token: the
        # first manifest read may still be the unauthenticated one the registry challenges); blobs
        # come slowly, so the batch is still reading when that credential is paused.
        proxy.add_rule(Rule(too_many_requests(str(int(pause))), method="GET", path_re="/blobs/", times=1))
        proxy.add_rule(Rule(delay(0.3), method="GET", path_re="/blobs/"))
        registries = {proxy.host: {"username": "first", "password": users["first"],
                                   "extra_credentials": [["second", users["second"]]]}}
        cluster: Cluster = make_cluster(FERRY_REGISTRIES=json.dumps(registries))
        cluster.start_worker("node0", concurrency=2)
        ts.clear()
        doc = run_batch(cluster, [f"{proxy.host}/{i.repo}:v1" for i in imgs], f"{dst.host}/mirror")
    assert doc["summary"]["synced"] == len(imgs)
    # Read from FERRY_REGISTRIES: "first" until its quota ran out, then every worker on "second" ...
    seen = [s.user for s in ts.issued()]
    assert seen[0] == "first" and "second" in seen and seen[seen.index("second"):].count("first") == 0
    # ... at once: the registry was not paused for the cluster, only the spent credential was.
    proxy.wait_idle()
    refused = proxy.select(status=429)[0].start
    assert [s for s in proxy.requests if refused + 0.5 < s.start < refused + pause - 0.5]
    with cluster.redis.client() as r:
        assert int(r.get(keys.credential(proxy.host)) or 0) == 1


def test_a_batch_completes_when_coordination_redis_dies_mid_batch(make_cluster, src: Registry, dst: Registry,
                                                                   src_pusher: Pusher, tmp_path: Path,
                                                                   make_fault_proxy: MakeProxy) -> None:
    imgs = [push_image(src_pusher, f"x/i{i}", layers=2, layer_size=8 * 1024) for i in range(10)]
    sproxy = make_fault_proxy(src.host)
    sproxy.add_rule(Rule(delay(0.3), method="GET", path_re=r"/manifests/"))  # a batch still running when it dies
    coord = RedisServer(tmp_path / "coord").start()
    try:
        cluster: Cluster = make_cluster(FERRY_COORDINATION__URL=coord.url,
                                        FERRY_REGISTRIES=json.dumps({sproxy.host: {"max_concurrency": 4}}))
        for i in range(2):
            cluster.start_worker(f"node{i}", concurrency=2)
        listing = cluster.listing([f"{sproxy.host}/{i.repo}:v1" for i in imgs])
        producer = cluster.producer_bg("enqueue", str(listing), "--target", f"{dst.host}/mirror", "--wait")
        batch = cluster.latest_batch()
        wait_until(lambda: len(cluster.hash(batch, "results")) >= 2, 60, "two images done")
        assert len(cluster.hash(batch, "results")) < len(imgs), "the batch finished before Redis could be killed"
        coord.kill()
        killed = time.monotonic()
        code, out, err = wait_proc(producer, 120)
        took = time.monotonic() - killed
    finally:
        coord.stop()
    assert code == 0, out + err + cluster.logs()[-4000:]
    for i in imgs:
        assert dst.manifest_digest(f"mirror/{i.repo}", "v1") == i.digest
    assert "coordination unavailable" in cluster.logs()
    # The README's bound: what was left of the batch, at its own pace, without waiting on the dead Redis.
    assert took < COORDINATION_LOSS_BOUND, took
