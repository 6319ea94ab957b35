"""Signatures, attestations and SBOMs travel with the image, byte for byte, between real registries.

The tag schema and cosign paths run against real docker-registry (2.8, which has no referrers API).
The API path runs against ``tests/support/referrers_api.py``: a small in-test implementation of the
OCI 1.1 referrers API over a real registry's stored content, since no registry packaged here has one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from config.jobs import SyncJob, SyncResult
from tests.support.artifacts import (
    SPDX,
    Artifact,
    cosign_attestation,
    cosign_sbom,
    cosign_signature,
    referrer,
    schema_tag,
    tag_schema_index,
)
from tests.support.cluster import Cluster, make_cluster_fixture  # noqa: F401  (fixture)
from tests.support.faultproxy import FaultProxy, Rule, add_headers, delay
from tests.support.images import OCI_INDEX, Image, Pusher, push_image
from tests.support.referrers_api import ReferrersAPI
from tests.support.registry import Registry
from tests.test_engine_copy import METERED, requests
from workers.engine.registry import RegistryEngine, RegistryOptions

VEX = "application/vnd.openvex+json"


@pytest.fixture
def engine() -> Iterator[RegistryEngine]:
    e = RegistryEngine(RegistryOptions(retry_attempts=2, retry_base_delay=0.01, retry_max_delay=0.02))
    yield e
    e.close()


def sync(engine: RegistryEngine, source: str, dest: str, *, platforms: tuple[str, ...] = (),
         referrers: bool = True, batch: str = "b") -> SyncResult:
    moved: list[int] = []
    job = SyncJob(batch_id=batch, source=source, destinations=[dest], platforms=list(platforms), referrers=referrers)
    result = engine.sync(job, moved.append)
    assert result.status != "failed", result.error
    assert sum(moved) == result.bytes_uploaded
    return result


def arrived(dst: Registry, repo: str, artifacts: list[Artifact]) -> list[bool]:
    """Per artifact: whether the destination holds it, with the source's digest, under the source's name."""
    return [dst.manifest_digest(repo, a.tag or a.digest) == a.digest for a in artifacts]


def children(reg: Registry, repo: str, ref: str) -> dict[str, tuple[str, int]]:
    r = httpx.get(f"{reg.url}/v2/{repo}/manifests/{ref}", headers={"Accept": OCI_INDEX})
    r.raise_for_status()
    return {m["platform"]["architecture"]: (m["digest"], m["size"]) for m in r.json()["manifests"]}


def manifest_size(src: Registry, img: Image) -> int:
    return len(httpx.get(f"{src.url}/v2/{img.repo}/manifests/{img.tag}", headers={"Accept": img.media_type}).content)


def app_with_sbom(src: Registry, pusher: Pusher) -> tuple[Image, int, Artifact]:
    """lib/app:v1 with one SBOM referrer in a tag schema index; returns the image, its size and the SBOM."""
    img = push_image(pusher, "lib/app", layers=1)
    size = manifest_size(src, img)
    sbom = referrer(pusher, "lib/app", img.digest, size, SPDX, "sbom")
    tag_schema_index(pusher, "lib/app", img.digest, [sbom])
    return img, size, sbom


def signed_app(src: Registry, pusher: Pusher) -> tuple[Image, list[Artifact], str]:
    """lib/app:v1 with cosign's .sig, .att and .sbom, and two OCI referrers (an SBOM and a VEX
    document) listed in a tag schema index; returns the image, the five artifacts and the index digest."""
    img = push_image(pusher, "lib/app", layers=1)
    sig = cosign_signature(pusher, "lib/app", img.digest)
    att = cosign_attestation(pusher, "lib/app", img.digest)
    sbom_tag = cosign_sbom(pusher, "lib/app", img.digest)
    size = manifest_size(src, img)
    sbom = referrer(pusher, "lib/app", img.digest, size, SPDX, "sbom")
    vex = referrer(pusher, "lib/app", img.digest, size, VEX, "not affected")
    index = tag_schema_index(pusher, "lib/app", img.digest, [sbom, vex])
    return img, [sig, att, sbom_tag, sbom, vex], index


def signed_index(src: Registry, pusher: Pusher) -> tuple[Image, tuple[Artifact, Artifact, Artifact], str]:
    """lib/multi:v1, an amd64+arm64 index signed with cosign, whose amd64 child is signed too and whose
    arm64 child has an SBOM referrer; returns the index, (index sig, amd64 sig, arm64 SBOM) and the
    arm64 child's tag schema index digest."""
    idx = push_image(pusher, "lib/multi", archs=("amd64", "arm64"), layers=1)
    amd64, arm64 = multi_children(src)
    arm64_size = children(src, "lib/multi", "v1")["arm64"][1]
    index_sig = cosign_signature(pusher, "lib/multi", idx.digest)
    amd64_sig = cosign_signature(pusher, "lib/multi", amd64)
    arm64_sbom = referrer(pusher, "lib/multi", arm64, arm64_size, SPDX, "arm64 sbom")
    return idx, (index_sig, amd64_sig, arm64_sbom), tag_schema_index(pusher, "lib/multi", arm64, [arm64_sbom])


def multi_children(src: Registry) -> tuple[str, str]:
    """The amd64 and arm64 children of lib/multi:v1."""
    kids = children(src, "lib/multi", "v1")
    return kids["amd64"][0], kids["arm64"][0]


def test_a_signed_image_arrives_with_its_signature_attestation_and_sboms(
        src: Registry, dst: Registry, src_pusher: Pusher, engine: RegistryEngine) -> None:
    img, every, index = signed_app(src, src_pusher)
    sig = every[0]

    r = sync(engine, f"{src.host}/lib/app:v1", f"{dst.host}/mirror/app:v1")
    d = r.destinations[0]
    assert (d.status, d.digest, d.referrers_copied) == ("synced", img.digest, 5)
    assert arrived(dst, "mirror/app", every) == [True] * 5
    # The source's tag schema index, byte for byte.
    assert dst.manifest_digest("mirror/app", schema_tag(img.digest)) == index

    again = sync(engine, f"{src.host}/lib/app:v1", f"{dst.host}/mirror/app:v1")
    assert (again.status, again.destinations[0].referrers_copied, again.bytes_uploaded) == ("up_to_date", 0, 0)

    # Signing the image again at the source reaches a mirror whose image did not change.
    resigned = cosign_signature(src_pusher, "lib/app", img.digest, note="second key")
    assert resigned.digest != sig.digest
    third = sync(engine, f"{src.host}/lib/app:v1", f"{dst.host}/mirror/app:v1")
    assert (third.status, third.destinations[0].referrers_copied) == ("synced", 1)
    assert arrived(dst, "mirror/app", [resigned]) == [True]


def test_index_children_bring_their_own_referrers_and_a_platform_filter_only_the_copied_ones(
        src: Registry, dst: Registry, src_pusher: Pusher, engine: RegistryEngine) -> None:
    idx, (index_sig, amd64_sig, arm64_sbom), arm64_index = signed_index(src, src_pusher)
    amd64, arm64 = multi_children(src)

    full = sync(engine, f"{src.host}/lib/multi:v1", f"{dst.host}/all/multi:v1")
    assert (full.destinations[0].digest, full.destinations[0].referrers_copied) == (idx.digest, 3)
    assert arrived(dst, "all/multi", [index_sig, amd64_sig, arm64_sbom]) == [True, True, True]
    assert dst.manifest_digest("all/multi", schema_tag(arm64)) == arm64_index

    one = sync(engine, f"{src.host}/lib/multi:v1", f"{dst.host}/amd64/multi:v1", platforms=("linux/amd64",))
    assert (one.destinations[0].digest, one.destinations[0].referrers_copied) == (amd64, 1)
    # The amd64 child's signature came; the arm64 child's SBOM and the (not pushed) index's signature did not.
    assert arrived(dst, "amd64/multi", [amd64_sig, arm64_sbom, index_sig]) == [True, False, False]
    assert dst.manifest_digest("amd64/multi", schema_tag(arm64)) is None


def test_no_referrers_copies_the_image_alone(src: Registry, dst: Registry, src_pusher: Pusher,
                                             engine: RegistryEngine) -> None:
    img = push_image(src_pusher, "lib/app", layers=1)
    sig = cosign_signature(src_pusher, "lib/app", img.digest)
    r = sync(engine, f"{src.host}/lib/app:v1", f"{dst.host}/mirror/app:v1", referrers=False)
    assert (r.destinations[0].status, r.destinations[0].referrers_copied) == ("synced", 0)
    assert dst.manifest_digest("mirror/app", "v1") == img.digest
    assert arrived(dst, "mirror/app", [sig]) == [False]

    off = RegistryEngine(RegistryOptions(referrers=False))
    try:
        sync(off, f"{src.host}/lib/app:v1", f"{dst.host}/other/app:v1")
    finally:
        off.close()
    assert arrived(dst, "other/app", [sig]) == [False]


def test_referrers_api_source_gives_a_tag_schema_destination_its_index(
        src: Registry, dst: Registry, src_pusher: Pusher, engine: RegistryEngine) -> None:
    api = ReferrersAPI(src, page_size=2).start()
    try:
        img = push_image(src_pusher, "lib/app", layers=1)
        size = manifest_size(src, img)
        # Three referrers known only through their subject: the API is the only way to find them,
        # and they need two pages.
        found = [referrer(src_pusher, "lib/app", img.digest, size, t, t) for t in (SPDX, VEX, "application/x.sig")]
        r = sync(engine, f"{api.host}/lib/app:v1", f"{dst.host}/mirror/app:v1")
        assert api.listings == [img.digest, img.digest]  # two pages
    finally:
        api.stop()
    assert r.destinations[0].referrers_copied == 3
    assert arrived(dst, "mirror/app", found) == [True] * 3
    index = httpx.get(f"{dst.url}/v2/mirror/app/manifests/{schema_tag(img.digest)}", headers={"Accept": OCI_INDEX})
    listed = index.json()["manifests"]
    assert sorted(m["digest"] for m in listed) == sorted(a.digest for a in found)
    assert {m["artifactType"] for m in listed} == {SPDX, VEX, "application/x.sig"}


def test_an_api_destination_indexes_what_is_pushed_and_gets_no_tag_schema_tag(
        src: Registry, dst: Registry, src_pusher: Pusher, engine: RegistryEngine) -> None:
    img, _, sbom = app_with_sbom(src, src_pusher)
    sig = cosign_signature(src_pusher, "lib/app", img.digest)
    api = ReferrersAPI(dst).start()
    try:
        r = sync(engine, f"{src.host}/lib/app:v1", f"{api.host}/mirror/app:v1")
        assert r.destinations[0].referrers_copied == 2
        assert [e["digest"] for e in api.referrers("mirror/app", img.digest)] == [sbom.digest]
        again = sync(engine, f"{src.host}/lib/app:v1", f"{api.host}/mirror/app:v1")
        assert (again.status, again.destinations[0].referrers_copied) == ("up_to_date", 0)
    finally:
        api.stop()
    assert arrived(dst, "mirror/app", [sbom, sig]) == [True, True]
    assert dst.manifest_digest("mirror/app", schema_tag(img.digest)) is None


def test_a_destination_index_keeps_referrers_only_the_destination_has(
        src: Registry, dst: Registry, src_pusher: Pusher, engine: RegistryEngine) -> None:
    img, size, sbom = app_with_sbom(src, src_pusher)
    sync(engine, f"{src.host}/lib/app:v1", f"{dst.host}/mirror/app:v1")
    # Someone signs the mirror itself; later the source gains a VEX document.
    dst_pusher = Pusher(dst.url)
    local = referrer(dst_pusher, "mirror/app", img.digest, size, "application/x.local-sig", "mirror signature")
    tag_schema_index(dst_pusher, "mirror/app", img.digest, [sbom, local])
    dst_pusher.client.close()
    vex = referrer(src_pusher, "lib/app", img.digest, size, VEX, "vex")
    tag_schema_index(src_pusher, "lib/app", img.digest, [sbom, vex])

    r = sync(engine, f"{src.host}/lib/app:v1", f"{dst.host}/mirror/app:v1")
    assert r.destinations[0].referrers_copied == 1
    index = httpx.get(f"{dst.url}/v2/mirror/app/manifests/{schema_tag(img.digest)}", headers={"Accept": OCI_INDEX})
    assert [m["digest"] for m in json.loads(index.content)["manifests"]] == [sbom.digest, vex.digest, local.digest]


def test_the_tag_list_is_read_while_the_image_is_copied(src: Registry, dst: Registry, src_pusher: Pusher,
                                                        engine: RegistryEngine,
                                                        make_fault_proxy: Callable[[str], FaultProxy]) -> None:
    # The referrer lookup reads the repository's tag list after the copy; the list does not depend
    # on the copy, so it is asked for beside the manifest, not one round trip later.
    proxy = make_fault_proxy(src.host)
    proxy.add_rule(Rule(delay(1.0), method="GET", path_re=r"/manifests/v1$"))
    push_image(src_pusher, "lib/app", layers=1)
    sync(engine, f"{proxy.host}/lib/app:v1", f"{dst.host}/m/app:v1")
    manifest, = proxy.select("GET", r"/manifests/v1$")
    listing, = proxy.select("GET", r"/tags/list")
    assert manifest.end is not None and listing.start < manifest.end, (manifest, listing)


@pytest.mark.parametrize("metered", [False, True], ids=["unmetered", "metered"])
def test_what_looking_for_referrers_costs_an_up_to_date_index(
        metered: bool, src: Registry, dst: Registry, src_pusher: Pusher, engine: RegistryEngine,
        make_fault_proxy: Callable[[str], FaultProxy]) -> None:
    proxy = make_fault_proxy(src.host)
    if metered:
        proxy.add_rule(Rule(add_headers(METERED)))
    idx = push_image(src_pusher, "lib/multi", archs=("amd64", "arm64"), layers=1)
    sync(engine, f"{proxy.host}/lib/multi:v1", f"{dst.host}/m/multi:v1")
    src_before, dst_before = len(proxy.requests), len(requests(dst))
    r = sync(engine, f"{proxy.host}/lib/multi:v1", f"{dst.host}/m/multi:v1")
    assert r.status == "up_to_date"
    # The image's manifest only: the registry's missing referrers API was learnt on the first
    # sync, and the repository's tag list, read once in the batch, holds no schema or cosign tag
    # for any of the three subjects (the index and its two children), so none is asked for.
    # Unmetered, a GET brings the index, which names the children. Metered, the HEAD is free but
    # says only "an index": the index is read back at the destination, which costs no pull.
    asked = "HEAD" if metered else "GET"
    assert [(s.method, s.path) for s in proxy.requests[src_before:]] == [(asked, "/v2/lib/multi/manifests/v1")]
    read_back = [("GET", f"/v2/m/multi/manifests/{idx.digest}")] if metered else []
    assert [(m, p) for m, p, _ in requests(dst)[dst_before:]] == [("HEAD", "/v2/m/multi/manifests/v1"), *read_back]

    # The next batch lists the repository once more, and still asks for no tag by HEAD.
    src_before = len(proxy.requests)
    assert sync(engine, f"{proxy.host}/lib/multi:v1", f"{dst.host}/m/multi:v1", batch="next").status == "up_to_date"
    assert [(s.method, s.path) for s in proxy.requests[src_before:]] == [
        (asked, "/v2/lib/multi/manifests/v1"), ("GET", "/v2/lib/multi/tags/list?n=1000")]


@pytest.mark.slow
def test_a_list_through_producer_and_worker_brings_referrers_as_each_line_asks(
        make_cluster: Callable[..., Cluster], src: Registry, dst: Registry, src_pusher: Pusher,
        tmp_path: Path) -> None:
    c = make_cluster()
    c.start_worker("node-a", concurrency=2)
    img, app_referrers, app_index = signed_app(src, src_pusher)
    idx, (index_sig, amd64_sig, arm64_sbom), arm64_index = signed_index(src, src_pusher)
    amd64, arm64 = multi_children(src)
    other = push_image(src_pusher, "lib/other", layers=1)
    other_sig = cosign_signature(src_pusher, "lib/other", other.digest)
    h = src.host
    listing = c.listing([f"{h}/lib/app:v1", f"{h}/lib/multi:v1",
                         f"--platform=linux/amd64 {h}/lib/multi:v1 {dst.host}/amd64/multi:v1",
                         f"--no-referrers {h}/lib/other:v1"])
    report = tmp_path / "report.json"
    run = c.producer("enqueue", str(listing), "--target", f"{dst.host}/mirror", "--wait", "--json", str(report))
    assert run.returncode == 0, run.stdout + run.stderr

    assert dst.manifest_digest("mirror/lib/app", "v1") == img.digest
    assert arrived(dst, "mirror/lib/app", app_referrers) == [True] * 5
    assert dst.manifest_digest("mirror/lib/app", schema_tag(img.digest)) == app_index
    assert dst.manifest_digest("mirror/lib/multi", "v1") == idx.digest
    assert arrived(dst, "mirror/lib/multi", [index_sig, amd64_sig, arm64_sbom]) == [True] * 3
    assert dst.manifest_digest("mirror/lib/multi", schema_tag(arm64)) == arm64_index
    assert dst.manifest_digest("amd64/multi", "v1") == amd64
    assert arrived(dst, "amd64/multi", [amd64_sig, arm64_sbom, index_sig]) == [True, False, False]
    assert dst.manifest_digest("mirror/lib/other", "v1") == other.digest
    assert arrived(dst, "mirror/lib/other", [other_sig]) == [False]
    copied = {d["destination"]: d["referrers_copied"]
              for i in json.loads(report.read_text())["images"] for d in i["destinations"]}
    assert copied == {f"{dst.host}/mirror/lib/app:v1": 5, f"{dst.host}/mirror/lib/multi:v1": 3,
                      f"{dst.host}/amd64/multi:v1": 1, f"{dst.host}/mirror/lib/other:v1": 0}
