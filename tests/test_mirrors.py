"""Pull-through mirrors that fail: the origin serves instead, and only what needed it goes round.

A mirror (a real registry holding a copy of the images) and the origin each sit behind a fault
proxy; every count is taken there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest

from config.jobs import SyncJob, SyncResult
from tests.support.faultproxy import FaultProxy, Rule, corrupt, status
from tests.support.images import Image, Pusher, push_image
from tests.support.procs import free_port
from tests.support.registry import Registry

pytestmark = pytest.mark.faults

MakeProxy = Callable[[str], FaultProxy]
ATTEMPTS = 2


def mirrored(src: Registry, mirror: Registry, repo: str) -> Image:
    """The same image (same bytes, same digest) in the origin and in the mirror."""
    with httpx.Client() as c:
        img = push_image(Pusher(src.url, client=c), repo, layers=2, layer_size=128 * 1024)
        assert push_image(Pusher(mirror.url, client=c), repo, layers=2, layer_size=128 * 1024).digest == img.digest
    return img


@pytest.fixture
def setup(src: Registry, make_registry: Callable[..., Registry],
          make_fault_proxy: MakeProxy) -> Iterator[tuple[Registry, FaultProxy, FaultProxy]]:
    mirror = make_registry("mirror")
    yield mirror, make_fault_proxy(src.host), make_fault_proxy(mirror.host)


def engine_for(origin: FaultProxy, mirror_host: str) -> Callable[[SyncJob], SyncResult]:
    from workers.engine.registry import RegistryEngine, RegistryOptions

    def run(job: SyncJob) -> SyncResult:
        e = RegistryEngine(RegistryOptions(retry_attempts=ATTEMPTS, retry_base_delay=0.01, retry_max_delay=0.02,
                                           mirrors={origin.host: [mirror_host]}))
        try:
            return e.sync(job, lambda n: None)
        finally:
            e.close()

    return run


def blob_gets(proxy: FaultProxy, digest: str | None = None) -> int:
    return proxy.count("GET", f"/blobs/{digest}" if digest else r"/blobs/sha256:", status=200)


@pytest.mark.parametrize("fault", ["5xx", "unreachable"])
def test_a_failing_mirror_hands_the_whole_image_to_the_origin(
        fault: str, setup: tuple[Registry, FaultProxy, FaultProxy], src: Registry, dst: Registry) -> None:
    mirror, origin, mproxy = setup
    img = mirrored(src, mirror, "lib/m")
    if fault == "5xx":
        mproxy.add_rule(Rule(status(503)))
        mirror_host = mproxy.host
    else:
        mirror_host = f"127.0.0.1:{free_port()}"  # nothing listens there
    r = engine_for(origin, mirror_host)(SyncJob(batch_id="b", source=f"{origin.host}/lib/m:v1",
                                               destinations=[f"{dst.host}/m/m:v1"]))
    assert r.status == "synced", r.error
    assert dst.manifest_digest("m/m", "v1") == img.digest
    origin.wait_idle()
    # The origin sent every blob, once; the mirror was asked and answered nothing useful.
    assert {d: blob_gets(origin, d) for d in img.blobs} == {d: 1 for d in img.blobs}
    if fault == "5xx":
        # The manifest request, retried, then given up on; beside it at most one tag listing for
        # the referrer lookup, never retried.
        assert mproxy.count(path_re="/manifests/", status=503) == ATTEMPTS
        assert mproxy.count(path_re="/tags/list", status=503) <= 1
        assert mproxy.count(status=200) == 0


def test_a_damaged_blob_sends_only_the_destinations_that_needed_it_round(
        setup: tuple[Registry, FaultProxy, FaultProxy], src: Registry,
        make_registry: Callable[..., Registry], make_fault_proxy: MakeProxy) -> None:
    mirror, origin, mproxy = setup
    img = mirrored(src, mirror, "lib/d")
    damaged = img.blobs[1]
    mproxy.add_rule(Rule(corrupt(1000), method="GET", path_re=f"/blobs/{damaged}"))
    needs, has = make_registry("needs"), make_registry("has")
    # One destination already holds the damaged layer: it never reads it, so it has no reason to go round.
    with httpx.Client() as c:
        Pusher(has.url, client=c).blob("m/d", httpx.get(f"{src.url}/v2/lib/d/blobs/{damaged}").content)
    pneeds, phas = make_fault_proxy(needs.host), make_fault_proxy(has.host)
    r = engine_for(origin, mproxy.host)(SyncJob(batch_id="b", source=f"{origin.host}/lib/d:v1",
                                               destinations=[f"{pneeds.host}/m/d:v1", f"{phas.host}/m/d:v1"]))
    assert r.status == "synced", r.error
    for reg in (needs, has):
        assert reg.manifest_digest("m/d", "v1") == img.digest
        assert all(reg.has_blob("m/d", b) for b in img.blobs)
    for p in (origin, mproxy, pneeds, phas):
        p.wait_idle()
    # The mirror served everything else (a download cut short when the damaged one failed the first
    # pass may be read again); the origin sent only the damaged layer, once.
    assert blob_gets(origin) == blob_gets(origin, damaged) == 1
    assert all(blob_gets(mproxy, d) >= 1 for d in img.blobs if d != damaged)
    # Only the destination that needed the layer went round: the other was written once.
    assert phas.count("PUT", "/manifests/", status=201) == 1
    assert phas.count("PUT", r"/blobs/uploads/.*digest=", status=201) == len(img.blobs) - 1
    assert pneeds.count("PUT", r"/blobs/uploads/.*digest=", status=201) == len(img.blobs)
    assert not any("/blobs/uploads/" in s.path and damaged.replace(":", "%3A") in s.path
                   for s in phas.select("PUT"))
