"""The docker engine against a real dockerd and real source/destination registries."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from config.jobs import SyncJob, SyncResult
from tests.support.docker_engine import images_for
from tests.support.dockerd import Dockerd
from tests.support.faultproxy import FaultProxy, Rule, delay
from tests.support.htpasswd import write_htpasswd
from tests.support.images import Image, Pusher, push_image
from tests.support.procs import wait_until
from tests.support.registry import Registry
from workers.engine.docker import LIMITS_WARNING, DockerEngine
from workers.engine.keychain import AnonymousKeychain, Credential, Keychain, StaticKeychain

pytestmark = pytest.mark.docker


class Counter:
    def __init__(self) -> None:
        self.total = 0
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self._lock:
            self.total += n


class Sleeps(list[float]):
    """Records the engine's backoff pauses (and does not wait them out)."""

    def __init__(self, on_sleep: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.on_sleep = on_sleep

    def __call__(self, seconds: float) -> None:
        self.append(seconds)
        if self.on_sleep is not None:
            self.on_sleep()


@pytest.fixture
def client(dockerd: Dockerd) -> Iterator[docker.DockerClient]:
    c = dockerd.client()
    yield c
    c.close()


def make_engine(
    dockerd: Dockerd, keychain: Keychain | None = None, sleeps: Sleeps | None = None, attempts: int = 3,
    **kw: Any,
) -> DockerEngine:
    return DockerEngine(
        dockerd.host,
        keychain or AnonymousKeychain(),
        attempts=attempts,
        base_delay=0.05,
        max_delay=0.2,
        sleep=sleeps if sleeps is not None else Sleeps(),
        **kw,
    )


def job(source: str, *destinations: str, platforms: tuple[str, ...] = ()) -> SyncJob:
    return SyncJob(
        batch_id="b-docker", source=source, destinations=list(destinations), platforms=list(platforms), engine="docker"
    )


def local_ids(client: docker.DockerClient) -> dict[str, list[str]]:
    return {i.id: i.tags for i in client.images.list(all=True)}


def assert_gone(client: docker.DockerClient, ids: set[str], *hosts: str) -> None:
    now = local_ids(client)
    assert ids.isdisjoint(now), "images the sync created are still in the daemon"
    assert not [t for tags in now.values() for t in tags if t.startswith(hosts)]


def test_five_images_sync_pull_back_and_clean_up(
    dockerd: Dockerd, client: docker.DockerClient, src: Registry, dst: Registry, src_pusher: Pusher
) -> None:
    images: list[tuple[Image, tuple[str, ...], str]] = [
        (push_image(src_pusher, "lib/plain", oci=False), (), "amd64"),
        (push_image(src_pusher, "lib/layered", "1.2", layers=4, layer_size=32 * 1024, oci=False), (), "amd64"),
        (push_image(src_pusher, "team/app", "2024", oci=False, salt="other"), (), "amd64"),
        (push_image(src_pusher, "lib/oci", oci=True), (), "amd64"),
        (push_image(src_pusher, "lib/multi", archs=("amd64", "arm64"), oci=False), ("linux/arm64",), "arm64"),
    ]
    engine = make_engine(dockerd)
    created: set[str] = set()
    refs: list[str] = []
    moved = [0, 0]
    try:
        for img, platforms, arch in images:
            progress = Counter()
            j = job(f"{src.host}/{img.repo}:{img.tag}", f"{dst.host}/mirror/{img.repo}:{img.tag}", platforms=platforms)
            res = engine.sync(j, progress)
            assert res.status == "synced", res.error
            assert res.engine == "docker" and res.source_digest == img.digest
            (d,) = res.destinations
            assert d.status == "synced" and d.destination == f"{dst.host}/mirror/{img.repo}:{img.tag}"
            # The destination serves exactly the digest the engine reports.
            assert dst.manifest_digest(f"mirror/{img.repo}", img.tag) == d.digest
            # Re-compressed, single-platform: never the source's digest, and the result says so.
            assert d.digest_changed and d.digest != img.digest
            assert LIMITS_WARNING in res.warnings
            # dockerd throttles progress events, so byte counts are a lower bound, never an overcount.
            assert res.bytes_downloaded <= (img.size if img.repo != "lib/multi" else img.size // 2 + 1024)
            assert d.blobs_copied >= 2
            assert progress.total == res.bytes_downloaded + res.bytes_uploaded
            moved[0] += res.bytes_downloaded
            moved[1] += res.bytes_uploaded
            assert res.local_refs == images_for(engine, j)
            for ref in res.local_refs:
                created.add(client.images.get(ref).id)
            refs += res.local_refs

            # The pushed tag pulls back, as the requested platform.
            pulled = client.images.pull(f"{dst.host}/mirror/{img.repo}", tag=img.tag)
            assert pulled.attrs["Architecture"] == arch
            assert pulled.id in created

        assert moved[0] > 0 and moved[1] > 0
        assert any(f"{src.host}/lib/multi" in t for tags in local_ids(client).values() for t in tags)
        stats = engine.cleanup(remove=refs)
        assert stats.errors == ()
        assert stats.freed_items >= len(images) and stats.freed_bytes > 0
        assert_gone(client, created, src.host, dst.host)
    finally:
        engine.close()


def test_several_platforms_push_one_tag_per_platform(
    dockerd: Dockerd, client: docker.DockerClient, src: Registry, dst: Registry, src_pusher: Pusher
) -> None:
    img = push_image(src_pusher, "lib/both", archs=("amd64", "arm64"), oci=True)
    engine = make_engine(dockerd)
    try:
        j = job(
            f"{src.host}/lib/both:v1",
            f"{dst.host}/m/both:v1",
            f"{dst.host}/n/both:v1",
            platforms=("linux/amd64", "linux/arm64"),
        )
        res = engine.sync(j, Counter())
        assert res.status == "synced", res.error
        assert res.source_digest == img.digest
        got = {d.destination: d.digest for d in res.destinations}
        assert set(got) == {f"{dst.host}/{r}/both:v1-linux-{a}" for r in ("m", "n") for a in ("amd64", "arm64")}
        for ref, digest in got.items():
            repo, tag = ref.removeprefix(f"{dst.host}/").split(":")
            assert dst.manifest_digest(repo, tag) == digest
        # No index was made, and the result says so plainly.
        assert dst.manifest_digest("m/both", "v1") is None
        assert any("cannot build a multi-platform index" in w for w in res.warnings)
        arches = {client.images.get(ref).attrs["Architecture"] for ref in got}
        assert arches == {"amd64", "arm64"}
        ids = {client.images.get(ref).id for ref in res.local_refs}

        stats = engine.cleanup(remove=images_for(engine, j))
        assert stats.errors == () and stats.freed_items >= 2
        assert_gone(client, ids, src.host, dst.host)
    finally:
        engine.close()


def test_index_without_platform_filter_copies_the_default_platform_and_warns(
    dockerd: Dockerd, src: Registry, dst: Registry, src_pusher: Pusher
) -> None:
    push_image(src_pusher, "lib/idx", archs=("amd64", "arm64"), oci=False)
    engine = make_engine(dockerd)
    try:
        j = job(f"{src.host}/lib/idx:v1", f"{dst.host}/m/idx:v1")
        res = engine.sync(j, Counter())
        assert res.status == "synced", res.error
        assert any("copied only linux/amd64" in w for w in res.warnings)
        assert dst.manifest_digest("m/idx", "v1") == res.destinations[0].digest
    finally:
        engine.cleanup(remove=images_for(engine, j))
        engine.close()


def test_permanent_errors_fail_fast_with_a_clear_message(
    dockerd: Dockerd, src: Registry, dst: Registry, src_pusher: Pusher
) -> None:
    push_image(src_pusher, "lib/present", oci=False)
    sleeps = Sleeps()
    engine = make_engine(dockerd, sleeps=sleeps, attempts=5)
    try:
        missing = engine.sync(job(f"{src.host}/lib/present:nope", f"{dst.host}/m/x:v1"), Counter())
        assert missing.status == "failed" and not missing.temporary
        assert missing.error_code == "MANIFEST_UNKNOWN"  # as the registry engine names it
        assert missing.error is not None
        # dockerd cannot tell a missing tag from a missing repository; the reason says so.
        assert missing.error == f"no tag nope in {src.host}/lib/present (or no such repository: the registry " \
            "does not say which)"

        no_platform = engine.sync(
            job(f"{src.host}/lib/present:v1", f"{dst.host}/m/x:v1", platforms=("linux/s390x",)), Counter()
        )
        assert no_platform.status == "failed" and not no_platform.temporary
        assert no_platform.error is not None and "no linux/s390x image" in no_platform.error

        bad_dest = engine.sync(job(f"{src.host}/lib/present:v1", f"{dst.host}/m/x@sha256:" + "a" * 64), Counter())
        assert bad_dest.status == "failed" and bad_dest.error is not None and "tag" in bad_dest.error
        assert sleeps == []  # nothing above was retried
        assert dst.manifest_digest("m/x", "v1") is None
    finally:
        engine.close()


def test_temporary_push_failure_is_retried_until_the_registry_is_back(
    dockerd: Dockerd, client: docker.DockerClient, src: Registry, dst: Registry, src_pusher: Pusher
) -> None:
    push_image(src_pusher, "lib/flaky", oci=False)
    dst.stop()

    def bring_back() -> None:
        if dst.proc is None:
            dst.start()

    sleeps = Sleeps(on_sleep=bring_back)
    engine = make_engine(dockerd, sleeps=sleeps, attempts=4)
    try:
        j = job(f"{src.host}/lib/flaky:v1", f"{dst.host}/m/flaky:v1")
        res = engine.sync(j, Counter())
        assert res.status == "synced", res.error
        assert len(sleeps) == 1  # one refused connection, then success
        assert dst.manifest_digest("m/flaky", "v1") == res.destinations[0].digest

        # With the registry gone for good, the result is a temporary failure after every attempt.
        dst.stop()
        sleeps.clear()
        sleeps.on_sleep = None
        res = engine.sync(j, Counter())
        assert res.status == "failed" and res.temporary
        assert len(sleeps) == 3
        assert res.error is not None and "connection refused" in res.error
        assert res.destinations[0].status == "failed"
    finally:
        engine.cleanup(remove=images_for(engine, j))
        engine.close()


def test_credentials_are_used_but_never_reported(
    dockerd: Dockerd, tmp_path: Path, src: Registry, src_pusher: Pusher, make_registry: Callable[..., Registry]
) -> None:
    password = "pw-Zq81-never-show-me"
    locked = make_registry("locked", htpasswd=write_htpasswd(tmp_path / "htpasswd", {"ferry": password}))
    push_image(src_pusher, "lib/secret", oci=False)
    j = job(f"{src.host}/lib/secret:v1", f"{locked.host}/m/secret:v1")

    good = make_engine(dockerd, StaticKeychain({locked.host: Credential("ferry", password)}))
    sleeps = Sleeps()
    wrong = make_engine(dockerd, StaticKeychain({locked.host: Credential("ferry", password + "-wrong")}), sleeps=sleeps)
    try:
        ok = good.sync(j, Counter())
        assert ok.status == "synced", ok.error
        denied = wrong.sync(j, Counter())
        assert denied.status == "failed" and not denied.temporary and sleeps == []
        assert denied.error_code in ("Unauthorized", "Denied")
        for res in (ok, denied):
            text = res.model_dump_json()
            assert password not in text and "pw-Zq81" not in text
            assert SyncResult.model_validate_json(text) == res
    finally:
        good.cleanup(remove=images_for(good, j))
        good.close()
        wrong.close()


def test_unreachable_daemon_is_a_temporary_failure(tmp_path: Path, src: Registry) -> None:
    sleeps = Sleeps()
    engine = DockerEngine(
        f"unix://{tmp_path}/no-daemon.sock", AnonymousKeychain(), attempts=3, base_delay=0.05, sleep=sleeps,
        keep_duration=60.0,
    )
    try:
        res = engine.sync(job(f"{src.host}/lib/any:v1", f"{src.host}/m/any:v1"), Counter())
        assert res.status == "failed" and res.temporary and res.error_code == "TransportError"
        assert res.error is not None and "docker daemon" in res.error
        assert len(sleeps) == 2
        stats = engine.cleanup(remove=[f"{src.host}/m/any:v1"])
        assert stats.freed_items == 0 and stats.errors and "docker daemon" in stats.errors[0]
    finally:
        engine.close()


def repo_spans(proxy: FaultProxy) -> list[tuple[float, float]]:
    """From the first request to the end of the last, per repository seen at ``proxy``."""
    spans: dict[str, tuple[float, float]] = {}
    for r in proxy.requests:
        m = re.match(r"^/v2/(.+)/(manifests|blobs)/", r.path)
        if m and r.end is not None:
            lo, hi = spans.get(m[1], (r.start, r.end))
            spans[m[1]] = (min(lo, r.start), max(hi, r.end))
    return list(spans.values())


def peak_overlap(spans: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    peak = cur = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak


def test_max_parallelism_caps_the_pulls_and_pushes_of_a_node(
    dockerd: Dockerd, tmp_path: Path, src: Registry, dst: Registry, src_pusher: Pusher,
    make_fault_proxy: Callable[[str], FaultProxy],
) -> None:
    n, limit = 4, 2
    for i in range(n):
        push_image(src_pusher, f"par/p{i}", layers=2, layer_size=64 * 1024, oci=False)
    sproxy, dproxy = make_fault_proxy(src.host), make_fault_proxy(dst.host)
    # Slow enough that transfers without a limit would all overlap.
    sproxy.add_rule(Rule(delay(0.5), method="GET", path_re="/blobs/"))
    dproxy.add_rule(Rule(delay(0.5), method="PUT", path_re="/blobs/uploads/"))
    # One engine per thread, each with its own lock files open: as the worker processes of one node.
    engines = [make_engine(dockerd, max_parallelism=limit, slot_dir=tmp_path / "slots") for _ in range(n)]
    results: list[SyncResult] = []
    jobs = [job(f"{sproxy.host}/par/p{i}:v1", f"{dproxy.host}/m/p{i}:v1") for i in range(n)]
    threads = [threading.Thread(target=lambda e=e, j=j: results.append(e.sync(j, Counter())))
               for e, j in zip(engines, jobs, strict=True)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
        assert [r.status for r in results] == ["synced"] * n, [r.error for r in results]
        sproxy.wait_idle()
        dproxy.wait_idle()
        # Counted where the daemon talks to the registries: never more than the limit, and the limit is used.
        assert peak_overlap(repo_spans(sproxy)) == limit
        assert peak_overlap(repo_spans(dproxy)) == limit
    finally:
        for e, j in zip(engines, jobs, strict=True):
            e.cleanup(remove=images_for(e, j))
            e.close()


def build_cache(client: docker.DockerClient) -> dict[str, dict[str, Any]]:
    return {r["ID"]: r for r in client.api.df().get("BuildCache") or []}


def prunable(records: dict[str, dict[str, Any]]) -> set[str]:
    """Build cache a plain prune may remove: not in use and not shared with an image."""
    return {i for i, r in records.items() if not r.get("InUse") and not r.get("Shared")}


def build_twice(dockerd: Dockerd, root: Path, tag: str) -> None:
    """Two builds under one tag: the first image is left dangling, and both leave build cache."""
    for n in range(2):
        ctx = root / f"{tag.replace('/', '-').replace(':', '-')}-{n}"
        ctx.mkdir(parents=True)
        (ctx / "payload").write_bytes(f"{tag} {n} {time.time_ns()}".encode() * 4096)
        (ctx / "Dockerfile").write_text("FROM scratch\nCOPY payload /payload\n")
        dockerd.buildkit_build(ctx, tag)


def dangling(client: docker.DockerClient) -> set[str]:
    return {i.id for i in client.images.list(filters={"dangling": True})}


def test_cleanup_prunes_dangling_images_and_build_cache_older_than_keep_duration(
    dockerd: Dockerd, client: docker.DockerClient, tmp_path: Path,
) -> None:
    """The seed workflow's ``gckeepduration``, with real BuildKit cache from ``docker build``."""
    build_twice(dockerd, tmp_path, "ferry-prune/x:old")
    old_images, old_cache = dangling(client), prunable(build_cache(client))
    old_done = time.time()
    assert old_images and old_cache
    tagged = {client.images.get("ferry-prune/x:old").id}
    age = 4.0
    wait_until(lambda: time.time() - old_done >= age, age + 1, "the first builds to age")
    new_start = time.time()
    build_twice(dockerd, tmp_path, "ferry-prune/x:new")
    new_images, new_cache = dangling(client) - old_images, prunable(build_cache(client)) - old_cache
    tagged.add(client.images.get("ferry-prune/x:new").id)
    assert new_images and new_cache
    # Older than keep_duration: only what the first builds left; the second builds are younger.
    keep = int(time.time() - new_start) + 2  # > the new builds' age, < the old ones' (at least `age` more)

    engine, everything = make_engine(dockerd, keep_duration=float(keep)), make_engine(dockerd, keep_duration=0.0)
    try:
        stats = engine.cleanup()
        assert stats.errors == ()
        assert stats.freed_items >= len(old_images) + len(old_cache) and stats.freed_bytes > 0
        left_images, left_cache = dangling(client), set(build_cache(client))
        assert old_images.isdisjoint(left_images) and old_cache.isdisjoint(left_cache)
        assert new_images <= left_images and new_cache <= left_cache
        assert tagged <= {i.id for i in client.images.list()}  # tagged images are never pruned

        everything.cleanup()
        assert new_images.isdisjoint(dangling(client))
        assert new_cache.isdisjoint(build_cache(client))
    finally:
        for tag in ("ferry-prune/x:old", "ferry-prune/x:new"):
            client.images.remove(tag, force=True)
        everything.cleanup()
        engine.close()
        everything.close()
