"""Registry faults through the whole system: a fault proxy in front of the real source registry,
real Redis, a real worker, real producer runs with their exit codes."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable

import pytest

from tests.support.cluster import Cluster, make_cluster_fixture  # noqa: F401  (fixture)
from tests.support.faultproxy import FaultProxy, Rule, corrupt, drop_after, stall, status, too_many_requests
from tests.support.images import Image, Pusher, push_image
from tests.support.registry import Registry

pytestmark = pytest.mark.faults

ATTEMPTS = 3  # per request (FERRY_RETRY__ATTEMPTS)
TASK_RETRIES = 2  # per image (FERRY_TASK_MAX_RETRIES)
TASK_RETRY_DELAY = 1.0  # seconds before the first task retry (FERRY_TASK_RETRY_DELAY)
READ_TIMEOUT = 2  # seconds (FERRY_READ_TIMEOUT)
# What the README allows on top of a pause, on a busy shared machine: the retry's publish, ETA timer
# and pool dispatch; for a request, the thread waking and the next request going out.
SCHEDULING = 1.0
RETRY_AFTER_SLACK = 1.0


@pytest.fixture
def cluster(make_cluster: Callable[..., Cluster]) -> Cluster:
    c = make_cluster(FERRY_RETRY__ATTEMPTS=str(ATTEMPTS), FERRY_TASK_MAX_RETRIES=str(TASK_RETRIES),
                     FERRY_TASK_RETRY_DELAY=str(TASK_RETRY_DELAY), FERRY_READ_TIMEOUT=str(READ_TIMEOUT))
    c.start_worker("w", concurrency=4)
    return c


def layer_of(img: Image) -> str:
    return img.blobs[-1]  # config first, then layers


def enqueue(c: Cluster, proxy: FaultProxy, dst: Registry, imgs: dict[str, Image],
            report: str = "report.json") -> tuple[int, str, dict[str, object]]:
    listing = c.listing([f"{proxy.host}/{repo}:v1" for repo in imgs])
    r = c.producer("enqueue", str(listing), "--target", f"{dst.host}/mirror", "--wait",
                   "--json", str(c.tmp / report), timeout=240)
    return r.returncode, r.stdout + r.stderr, json.loads((c.tmp / report).read_text())


def by_repo(doc: dict[str, object]) -> dict[str, dict[str, object]]:
    images = doc["images"]
    assert isinstance(images, list)
    return {str(i["source"]).split("/", 1)[1].rsplit(":", 1)[0]: i for i in images}


def test_temporary_faults_are_ridden_out(cluster: Cluster, src: Registry, dst: Registry, src_pusher: Pusher,
                                         make_fault_proxy: Callable[[str], FaultProxy]) -> None:
    imgs = {
        "unavailable/a": push_image(src_pusher, "unavailable/a", layers=1),
        "limited/b": push_image(src_pusher, "limited/b", layers=1),
        "dropped/c": push_image(src_pusher, "dropped/c", layers=1, layer_size=1024 * 1024),
        "stalled/d": push_image(src_pusher, "stalled/d", layers=1, layer_size=512 * 1024),
    }
    proxy = make_fault_proxy(src.host)
    # 503 for a while: fewer failures than the per-request budget.
    proxy.add_rule(Rule(status(503), path_re=r"/unavailable/a/manifests/", times=ATTEMPTS - 1))
    proxy.add_rule(Rule(too_many_requests("1"), method="GET", path_re=f"/blobs/{layer_of(imgs['limited/b'])}",
                        times=2))
    proxy.add_rule(Rule(drop_after(300 * 1024), method="GET", path_re=f"/blobs/{layer_of(imgs['dropped/c'])}",
                        times=1))
    proxy.add_rule(Rule(stall(READ_TIMEOUT * 5, after=128 * 1024), method="GET",
                        path_re=f"/blobs/{layer_of(imgs['stalled/d'])}", times=1))

    code, out, doc = enqueue(cluster, proxy, dst, imgs)
    assert code == 0, out
    for repo, img in imgs.items():
        assert dst.manifest_digest(f"mirror/{repo}", "v1") == img.digest, repo
    assert {i["status"] for i in by_repo(doc).values()} == {"synced"}

    assert proxy.count(path_re=r"/unavailable/a/manifests/", status=503) == ATTEMPTS - 1
    # Retry-After: 1 was honoured: each retry came at least ~1 s after the 429 before it.
    gets = proxy.select("GET", f"/blobs/{layer_of(imgs['limited/b'])}")
    assert [s.status for s in gets] == [429, 429, 200]
    gaps = [b.start - a.start for a, b in itertools.pairwise(gets)]
    assert all(1.0 <= g <= 1.0 + RETRY_AFTER_SLACK for g in gaps), gaps
    # The cut download was resumed or restarted, and the stalled one timed out well before the stall ended.
    assert proxy.count("GET", f"/blobs/{layer_of(imgs['dropped/c'])}") >= 2
    stalled = proxy.select("GET", f"/blobs/{layer_of(imgs['stalled/d'])}")
    assert len(stalled) >= 2
    waited = stalled[1].start - stalled[0].start
    assert READ_TIMEOUT * 0.8 <= waited < READ_TIMEOUT * 5


def test_registry_down_fails_its_images_and_retry_reruns_only_those(
        cluster: Cluster, src: Registry, dst: Registry, src_pusher: Pusher,
        make_fault_proxy: Callable[[str], FaultProxy]) -> None:
    imgs = {f"down/x{i}": push_image(src_pusher, f"down/x{i}", layers=1) for i in range(2)}
    imgs |= {f"up/y{i}": push_image(src_pusher, f"up/y{i}", layers=1) for i in range(3)}
    proxy = make_fault_proxy(src.host)
    proxy.add_rule(Rule(status(503), path_re=r"^/v2/down/"))  # always

    code, out, doc = enqueue(cluster, proxy, dst, imgs)
    assert code == 1, out
    res = by_repo(doc)
    for repo in ("down/x0", "down/x1"):
        assert res[repo]["status"] == "failed"
        assert "503" in str(res[repo]["error"]), res[repo]
        assert dst.manifest_digest(f"mirror/{repo}", "v1") is None
    for repo in ("up/y0", "up/y1", "up/y2"):
        assert res[repo]["status"] == "synced"
        assert dst.manifest_digest(f"mirror/{repo}", "v1") == imgs[repo].digest
    # Each failure's reason is printed once: as it happens, not again under the summary.
    for repo in ("down/x0", "down/x1"):
        told = [line for line in out.splitlines() if line.lower().startswith("failed line") and repo in line]
        assert len(told) == 1, out
    # The whole budget was spent on each dead image, and no more: ATTEMPTS requests per task run,
    # the runs spaced TASK_RETRY_DELAY, then twice that, each up to a quarter longer.
    for repo in ("down/x0", "down/x1"):
        seen = sorted(proxy.select(path_re=f"^/v2/{repo}/manifests/"), key=lambda s: s.start)
        assert len(seen) == ATTEMPTS * (TASK_RETRIES + 1)
        # Beside each run, at most one tag listing for the referrer lookup, never retried.
        assert proxy.count(path_re=f"^/v2/{repo}/tags/list") <= TASK_RETRIES + 1
        runs = [seen[i:i + ATTEMPTS] for i in range(0, len(seen), ATTEMPTS)]
        for n, (a, b) in enumerate(itertools.pairwise(runs)):
            end = a[-1].end
            assert end is not None
            pause = TASK_RETRY_DELAY * 2**n
            assert pause <= b[0].start - end <= pause * 1.25 + SCHEDULING, (n, b[0].start - end)

    proxy.clear_rules()
    proxy.reset_counts()
    batch = str(doc["batch_id"])
    r = cluster.producer("retry", batch, "--wait", "--json", str(cluster.tmp / "retry.json"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 failed image(s) enqueued again" in r.stderr
    paths = {s.path.split("/")[2] for s in proxy.requests}
    assert paths == {"down"}, paths  # the synced images were not touched again
    for repo, img in imgs.items():
        assert dst.manifest_digest(f"mirror/{repo}", "v1") == img.digest
    after = json.loads((cluster.tmp / "retry.json").read_text())
    assert after["summary"]["synced"] == 2 and after["summary"]["failed"] == 0  # the retry's own images
    whole = json.loads(cluster.producer("report", batch, "--json", "-").stdout)
    assert whole["summary"]["synced"] == 5 and whole["summary"]["failed"] == 0


def test_corrupted_blob_is_never_committed(cluster: Cluster, src: Registry, dst: Registry, src_pusher: Pusher,
                                           make_fault_proxy: Callable[[str], FaultProxy]) -> None:
    imgs = {"bad/z": push_image(src_pusher, "bad/z", layers=1, layer_size=256 * 1024),
            "good/g": push_image(src_pusher, "good/g", layers=1)}
    bad = layer_of(imgs["bad/z"])
    proxy = make_fault_proxy(src.host)
    proxy.add_rule(Rule(corrupt(1000), method="GET", path_re=f"/blobs/{bad}"))  # every time

    code, out, doc = enqueue(cluster, proxy, dst, imgs)
    assert code == 1, out
    res = by_repo(doc)
    assert res["bad/z"]["status"] == "failed"
    assert res["bad/z"]["error_code"] == "DigestMismatch", res["bad/z"]
    assert f"blob {bad}: content hashes to sha256:" in str(res["bad/z"]["error"])
    assert res["good/g"]["status"] == "synced"
    assert not dst.has_blob("mirror/bad/z", bad)
    assert dst.manifest_digest("mirror/bad/z", "v1") is None
    # Corruption is final: not retried as if it were a passing fault.
    assert res["bad/z"].get("temporary") in (False, None)
