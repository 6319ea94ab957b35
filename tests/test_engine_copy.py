"""Whole-image copies through RegistryEngine between real registries."""

from __future__ import annotations

import http.server
import json
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from config.jobs import SyncJob, SyncResult
from tests.support.faultproxy import DropAfter, FaultProxy, Rule, add_headers
from tests.support.images import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Pusher,
    layer,
    push_image,
    sha,
)
from tests.support.procs import free_port
from tests.support.registry import Registry
from tests.support.tokenserver import TokenServer
from workers.engine.auth import RegistryAuth
from workers.engine.copy import MAX_DEPTH
from workers.engine.keychain import Credential, StaticKeychain
from workers.engine.registry import RegistryEngine, RegistryOptions

ACCEPT = f"{OCI_INDEX}, {OCI_MANIFEST}, {DOCKER_LIST}, {DOCKER_MANIFEST}"
# Headers of a registry that counts pulls, as Docker Hub does.
METERED = {"RateLimit-Limit": "100;w=21600", "RateLimit-Remaining": "90;w=21600"}


def requests(reg: Registry) -> list[tuple[str, str, int]]:
    """(method, path, status) for every request in the registry's access log."""
    return [(m, p, int(s)) for m, p, s in re.findall(r'"([A-Z]+) (\S+) HTTP/1\.1" (\d{3})', reg.log())]


def manifest_puts(reg: Registry) -> list[str]:
    return [p for m, p, _ in requests(reg) if m == "PUT" and "/manifests/" in p]


def get_manifest(reg: Registry, repo: str, ref: str) -> bytes:
    r = httpx.get(f"{reg.url}/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT})
    r.raise_for_status()
    return r.content


@pytest.fixture
def engine() -> Iterator[RegistryEngine]:
    e = RegistryEngine(RegistryOptions(retry_attempts=2, retry_base_delay=0.01, retry_max_delay=0.02,
                                       chunk_size=1024 * 1024))
    yield e
    e.close()


def sync(engine: RegistryEngine, source: str, *dests: str, platforms: tuple[str, ...] = ()) -> SyncResult:
    moved: list[int] = []
    lock = threading.Lock()

    def progress(n: int) -> None:
        with lock:
            moved.append(n)

    result = engine.sync(SyncJob(batch_id="b", source=source, destinations=list(dests),
                                 platforms=list(platforms)), progress)
    assert sum(moved) == result.bytes_uploaded
    return result


@pytest.mark.parametrize("oci", [True, False], ids=["oci", "docker-v2"])
def test_single_platform_image(oci: bool, src: Registry, dst: Registry, src_pusher: Pusher,
                               engine: RegistryEngine) -> None:
    img = push_image(src_pusher, "lib/app", oci=oci, layers=3)
    r = sync(engine, f"{src.host}/lib/app:v1", f"{dst.host}/mirror/app:v1")
    assert r.status == "synced", r.error
    assert r.source_digest == img.digest
    d = r.destinations[0]
    assert (d.status, d.digest, d.blobs_copied, d.digest_changed) == ("synced", img.digest, 4, False)
    assert d.bytes_transferred == r.bytes_uploaded == r.bytes_downloaded > img.size
    assert dst.manifest_digest("mirror/app", "v1") == img.digest
    assert all(dst.has_blob("mirror/app", b) for b in img.blobs)
    assert manifest_puts(dst) == ["/v2/mirror/app/manifests/v1"]


def _attestation(pusher: Pusher, repo: str) -> dict[str, object]:
    statement = b'{"_type":"https://in-toto.io/Statement/v0.1"}'
    cfg = b"{}"
    man = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                      "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                 "digest": pusher.blob(repo, cfg), "size": len(cfg)},
                      "layers": [{"mediaType": "application/vnd.in-toto+json",
                                  "digest": pusher.blob(repo, statement), "size": len(statement)}]}).encode()
    d = pusher.manifest(repo, sha(man), man, OCI_MANIFEST)
    return {"mediaType": OCI_MANIFEST, "digest": d, "size": len(man),
            "platform": {"architecture": "unknown", "os": "unknown"},
            "annotations": {"vnd.docker.reference.type": "attestation-manifest"}}


def test_multi_arch_index_is_copied_byte_for_byte(src: Registry, dst: Registry, src_pusher: Pusher,
                                                  engine: RegistryEngine) -> None:
    att = _attestation(src_pusher, "lib/multi")
    img = push_image(src_pusher, "lib/multi", archs=("amd64", "arm64", "s390x"), extra_index_entries=[att])
    r = sync(engine, f"{src.host}/lib/multi:v1", f"{dst.host}/m/multi:v1")
    assert r.status == "synced", r.error
    assert dst.manifest_digest("m/multi", "v1") == img.digest
    assert get_manifest(dst, "m/multi", "v1") == get_manifest(src, "lib/multi", "v1")
    assert dst.manifest_digest("m/multi", str(att["digest"])) == att["digest"]  # unknown/unknown kept
    assert r.destinations[0].blobs_copied == len(img.blobs) + 2
    # Children go in (by digest) before the index that names them; the tag is last.
    puts = manifest_puts(dst)
    assert len(puts) == 5 and puts[-1] == "/v2/m/multi/manifests/v1"
    assert all("/manifests/sha256:" in p for p in puts[:-1])


def test_platform_filter(src: Registry, dst: Registry, src_pusher: Pusher, engine: RegistryEngine) -> None:
    push_image(src_pusher, "lib/multi", archs=("amd64", "arm64", "s390x"))
    index = json.loads(get_manifest(src, "lib/multi", "v1"))
    by_arch = {e["platform"]["architecture"]: e["digest"] for e in index["manifests"]}

    one = sync(engine, f"{src.host}/lib/multi:v1", f"{dst.host}/m/one:v1", platforms=("linux/arm64",))
    assert one.status == "synced", one.error
    assert one.destinations[0].digest == by_arch["arm64"] and one.destinations[0].digest_changed
    assert dst.manifest_digest("m/one", "v1") == by_arch["arm64"]
    assert one.destinations[0].blobs_copied == 3  # config and two layers of arm64 only

    two = sync(engine, f"{src.host}/lib/multi:v1", f"{dst.host}/m/two:v1",
               platforms=("linux/amd64", "linux/s390x"))
    assert two.status == "synced", two.error
    pushed = json.loads(get_manifest(dst, "m/two", "v1"))
    assert [e["platform"]["architecture"] for e in pushed["manifests"]] == ["amd64", "s390x"]
    assert two.destinations[0].digest_changed
    assert two.destinations[0].digest == dst.manifest_digest("m/two", "v1") != two.source_digest
    # The filtered index is deterministic, so the next run finds it current.
    again = sync(engine, f"{src.host}/lib/multi:v1", f"{dst.host}/m/two:v1",
                 platforms=("linux/amd64", "linux/s390x"))
    assert again.status == "up_to_date"

    none = sync(engine, f"{src.host}/lib/multi:v1", f"{dst.host}/m/none:v1", platforms=("linux/ppc64le",))
    assert none.status == "failed" and not none.temporary
    assert "linux/amd64" in (none.error or "") and "ppc64le" in (none.error or "")


def test_artifact_and_nested_index(src: Registry, dst: Registry, src_pusher: Pusher,
                                   engine: RegistryEngine) -> None:
    p = src_pusher
    cfg = b'{"chart":"demo"}'
    data = b"not a tarball"
    art = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.chart",
        "config": {"mediaType": "application/vnd.example.config.v1+json", "digest": p.blob("art/x", cfg),
                   "size": len(cfg)},
        "layers": [{"mediaType": "application/vnd.example.data", "digest": p.blob("art/x", data),
                    "size": len(data)}],
        "annotations": {"org.opencontainers.image.title": "demo"},
    }, separators=(",", ":")).encode()
    art_digest = p.manifest("art/x", sha(art), art, OCI_MANIFEST)
    inner = push_image(p, "art/x", tag="inner", archs=("amd64", "arm64"))
    outer = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_INDEX, "digest": inner.digest, "size": len(get_manifest(src, "art/x", "inner"))},
        {"mediaType": OCI_MANIFEST, "digest": art_digest, "size": len(art),
         "artifactType": "application/vnd.example.chart"},
    ]}).encode()
    outer_digest = p.manifest("art/x", "nested", outer, OCI_INDEX)
    p.manifest("art/x", "artifact", art, OCI_MANIFEST)

    r = sync(engine, f"{src.host}/art/x:artifact", f"{dst.host}/art/x:artifact")
    assert r.status == "synced", r.error
    assert get_manifest(dst, "art/x", "artifact") == art
    assert dst.has_blob("art/x", sha(cfg)) and dst.has_blob("art/x", sha(data))

    r = sync(engine, f"{src.host}/art/x:nested", f"{dst.host}/nest/x:nested")
    assert r.status == "synced", r.error
    assert dst.manifest_digest("nest/x", "nested") == outer_digest
    assert dst.manifest_digest("nest/x", inner.digest) == inner.digest
    assert all(dst.has_blob("nest/x", b) for b in inner.blobs)


def _nest(pusher: Pusher, repo: str, tag: str, child: bytes, extra: list[dict[str, object]] | None = None) -> bytes:
    """Push an index whose first entry is the index ``child`` (no platform of its own)."""
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_INDEX, "digest": sha(child), "size": len(child)}, *(extra or [])]}
    raw = json.dumps(doc).encode()
    pusher.manifest(repo, tag, raw, OCI_INDEX)
    return raw


def test_platform_filter_looks_inside_nested_indexes(src: Registry, dst: Registry, src_pusher: Pusher,
                                                     engine: RegistryEngine) -> None:
    p = src_pusher
    push_image(p, "nest/p", tag="inner", archs=("amd64", "arm64"))
    inner = get_manifest(src, "nest/p", "inner")
    by_arch = {e["platform"]["architecture"]: e for e in json.loads(inner)["manifests"]}
    solo = push_image(p, "nest/p", tag="solo", archs=("s390x",))
    s390x = {"mediaType": OCI_MANIFEST, "digest": solo.digest, "size": len(get_manifest(src, "nest/p", "solo")),
             "platform": {"architecture": "s390x", "os": "linux"}}
    _nest(p, "nest/p", "v1", inner, extra=[s390x])

    one = sync(engine, f"{src.host}/nest/p:v1", f"{dst.host}/m/one:v1", platforms=("linux/arm64",))
    assert one.status == "synced", one.error
    assert dst.manifest_digest("m/one", "v1") == by_arch["arm64"]["digest"]

    two = sync(engine, f"{src.host}/nest/p:v1", f"{dst.host}/m/two:v1", platforms=("linux/amd64", "linux/s390x"))
    assert two.status == "synced", two.error
    pushed = json.loads(get_manifest(dst, "m/two", "v1"))
    # One flat index of what matched, wherever it sat.
    assert [e["digest"] for e in pushed["manifests"]] == [by_arch["amd64"]["digest"], solo.digest]
    assert two.destinations[0].digest_changed

    none = sync(engine, f"{src.host}/nest/p:v1", f"{dst.host}/m/none:v1", platforms=("linux/ppc64le",))
    assert none.status == "failed" and not none.temporary
    assert "linux/amd64, linux/arm64, linux/s390x" in (none.error or "")


def test_nesting_is_followed_only_so_deep(src: Registry, dst: Registry, src_pusher: Pusher,
                                          engine: RegistryEngine) -> None:
    push_image(src_pusher, "deep/p", tag="leaf", archs=("amd64", "arm64"))
    raw = get_manifest(src, "deep/p", "leaf")
    for level in range(MAX_DEPTH):
        raw = _nest(src_pusher, "deep/p", f"l{level}", raw)
    # The arm64 manifest lies MAX_DEPTH levels under l{MAX_DEPTH - 2}, one more under l{MAX_DEPTH - 1}.
    ok = sync(engine, f"{src.host}/deep/p:l{MAX_DEPTH - 2}", f"{dst.host}/m/ok:v1", platforms=("linux/arm64",))
    assert ok.status == "synced", ok.error
    deep = sync(engine, f"{src.host}/deep/p:l{MAX_DEPTH - 1}", f"{dst.host}/m/deep:v1", platforms=("linux/arm64",))
    assert deep.status == "failed" and f"nested deeper than {MAX_DEPTH} levels" in (deep.error or "")


def test_docker_manifest_list(src: Registry, dst: Registry, src_pusher: Pusher, engine: RegistryEngine) -> None:
    img = push_image(src_pusher, "lib/dl", archs=("amd64", "arm64", "s390x"), oci=False)
    assert img.media_type == DOCKER_LIST
    r = sync(engine, f"{src.host}/lib/dl:v1", f"{dst.host}/m/dl:v1")
    assert r.status == "synced", r.error
    assert dst.manifest_digest("m/dl", "v1") == img.digest
    assert get_manifest(dst, "m/dl", "v1") == get_manifest(src, "lib/dl", "v1")
    assert all(dst.has_blob("m/dl", b) for b in img.blobs)
    listed = json.loads(get_manifest(src, "lib/dl", "v1"))["manifests"]
    for entry in listed:  # every child keeps its docker media type and digest
        assert entry["mediaType"] == DOCKER_MANIFEST
        assert dst.manifest_digest("m/dl", entry["digest"]) == entry["digest"]

    two = sync(engine, f"{src.host}/lib/dl:v1", f"{dst.host}/m/two:v1", platforms=("linux/amd64", "linux/s390x"))
    assert two.status == "synced", two.error
    pushed = json.loads(get_manifest(dst, "m/two", "v1"))
    assert pushed["mediaType"] == DOCKER_LIST
    assert [e["platform"]["architecture"] for e in pushed["manifests"]] == ["amd64", "s390x"]
    one = sync(engine, f"{src.host}/lib/dl:v1", f"{dst.host}/m/one:v1", platforms=("linux/arm64",))
    assert one.status == "synced", one.error
    assert dst.manifest_digest("m/one", "v1") == next(
        e["digest"] for e in listed if e["platform"]["architecture"] == "arm64")


def test_digest_pinned_source(src: Registry, dst: Registry, src_pusher: Pusher,
                              engine: RegistryEngine) -> None:
    img = push_image(src_pusher, "lib/pin", archs=("amd64", "arm64"))
    r = sync(engine, f"{src.host}/lib/pin@{img.digest}", f"{dst.host}/p/tagged:stable",
             f"{dst.host}/p/bydigest@{img.digest}")
    assert r.status == "synced", r.error
    assert dst.manifest_digest("p/tagged", "stable") == img.digest
    assert dst.manifest_digest("p/bydigest", img.digest) == img.digest
    assert f"/v2/p/bydigest/manifests/{img.digest}" in manifest_puts(dst)
    # The second destination reused the first's blobs by mounting them.
    assert r.destinations[1].blobs_mounted == len(img.blobs) and r.destinations[1].blobs_copied == 0


@pytest.mark.parametrize("metered", [False, True], ids=["unmetered", "metered"])
def test_up_to_date_image_costs_one_request_per_side(metered: bool, src: Registry, dst: Registry,
                                                     src_pusher: Pusher,
                                                     make_fault_proxy: Callable[[str], FaultProxy]) -> None:
    # The source answers the digest and the manifest in one GET (needed whenever a destination
    # lacks the image), or where manifest GETs are metered, a HEAD, which is free there.
    # Without referrers; tests/test_referrers.py counts what looking for them adds.
    proxy = make_fault_proxy(src.host)
    if metered:
        proxy.add_rule(Rule(add_headers(METERED)))
    engine = RegistryEngine(RegistryOptions(referrers=False))
    try:
        push_image(src_pusher, "lib/app", archs=("amd64", "arm64"))
        assert sync(engine, f"{proxy.host}/lib/app:v1", f"{dst.host}/m/app:v1").status == "synced"
        src_before, dst_before = len(proxy.requests), len(requests(dst))
        r = sync(engine, f"{proxy.host}/lib/app:v1", f"{dst.host}/m/app:v1")
    finally:
        engine.close()
    assert r.status == "up_to_date" and r.destinations[0].status == "up_to_date"
    assert r.bytes_uploaded == r.bytes_downloaded == 0
    asked = "HEAD" if metered else "GET"
    assert [(s.method, s.path) for s in proxy.requests[src_before:]] == [(asked, "/v2/lib/app/manifests/v1")]
    assert [(m, p) for m, p, _ in requests(dst)[dst_before:]] == [("HEAD", "/v2/m/app/manifests/v1")]


def test_a_cold_copy_reads_the_source_manifest_once(src: Registry, dst: Registry, src_pusher: Pusher,
                                                    engine: RegistryEngine) -> None:
    img = push_image(src_pusher, "lib/once")
    pushed = len(requests(src))
    r = sync(engine, f"{src.host}/lib/once:v1", f"{dst.host}/m/once:v1")
    assert r.status == "synced" and dst.manifest_digest("m/once", "v1") == img.digest
    manifests = [(m, p) for m, p, _ in requests(src)[pushed:] if "/manifests/" in p]
    assert manifests == [("GET", "/v2/lib/once/manifests/v1")]


def test_blobs_the_destination_has_are_skipped_or_mounted(src: Registry, dst: Registry, src_pusher: Pusher,
                                                          engine: RegistryEngine) -> None:
    push_image(src_pusher, "lib/a", layers=3, base=2, salt="a")
    push_image(src_pusher, "lib/b", layers=3, base=2, salt="b")
    # The destination already holds lib/a's base layers in the same repository.
    base_blob, _ = layer("base-amd64-0-65536", 65536)
    dst_pusher = Pusher(dst.url)
    try:
        dst_pusher.blob("m/a", base_blob)
    finally:
        dst_pusher.client.close()
    a = sync(engine, f"{src.host}/lib/a:v1", f"{dst.host}/m/a:v1")
    assert a.status == "synced", a.error
    assert (a.destinations[0].blobs_skipped, a.destinations[0].blobs_copied) == (1, 3)
    # lib/b shares two base layers with m/a, which is on the same registry: mounted, not uploaded.
    b = sync(engine, f"{src.host}/lib/b:v1", f"{dst.host}/m/b:v1")
    d = b.destinations[0]
    assert (d.blobs_mounted, d.blobs_copied, d.blobs_skipped) == (2, 2, 0)
    assert any(m == "POST" and "mount=" in p and "from=m%2Fa" in p and s == 201 for m, p, s in requests(dst))


def test_copy_within_one_registry_mounts_everything(src: Registry, src_pusher: Pusher,
                                                    engine: RegistryEngine) -> None:
    img = push_image(src_pusher, "lib/app", layers=2)
    r = sync(engine, f"{src.host}/lib/app:v1", f"{src.host}/copy/app:v1")
    assert r.status == "synced", r.error
    assert r.destinations[0].blobs_mounted == len(img.blobs) and r.bytes_uploaded == 0
    assert src.manifest_digest("copy/app", "v1") == img.digest


def test_failures_are_results_not_exceptions(src: Registry, dst: Registry, src_pusher: Pusher,
                                             engine: RegistryEngine) -> None:
    # What is missing, named once: the image is the task's, so the reason does not repeat it.
    no_repo = sync(engine, f"{src.host}/lib/nope:1.99", f"{dst.host}/m/nope:1.99")
    assert no_repo.status == "failed" and not no_repo.temporary
    assert no_repo.error_code == "NAME_UNKNOWN"
    assert no_repo.error == f"no repository {src.host}/lib/nope"

    img = push_image(src_pusher, "lib/app")
    no_tag = sync(engine, f"{src.host}/lib/app:v9.9", f"{dst.host}/m/app:v9.9")
    assert (no_tag.error_code, no_tag.error) == ("MANIFEST_UNKNOWN", f"no tag v9.9 in {src.host}/lib/app")
    absent = "sha256:" + "e" * 64
    no_digest = sync(engine, f"{src.host}/lib/app@{absent}", f"{dst.host}/m/app@{absent}")
    assert no_digest.error == f"no manifest {absent} in {src.host}/lib/app"

    nobody = free_port()  # nothing listens there
    r = sync(engine, f"{src.host}/lib/app:v1", f"{dst.host}/m/app:v1", f"127.0.0.1:{nobody}/m/app:v1")
    # One destination down: the other still gets its copy; the task may retry later.
    assert [d.status for d in r.destinations] == ["synced", "failed"]
    assert r.status == "failed" and r.temporary and r.error_code == "TransportError"
    assert r.destinations[1].error == f"connection refused to 127.0.0.1:{nobody}"
    assert r.error == f"127.0.0.1:{nobody}/m/app:v1: connection refused to 127.0.0.1:{nobody}"
    assert dst.manifest_digest("m/app", "v1") == r.source_digest == img.digest

    bad = engine.sync(SyncJob(batch_id="b", source="Not A Ref!", destinations=[f"{dst.host}/x:y"]),
                      lambda n: None)
    assert bad.status == "failed" and bad.error_code == "INVALID_REFERENCE"


def test_a_metered_source_spends_no_manifest_get_on_a_missing_image(
        src: Registry, dst: Registry, src_pusher: Pusher, engine: RegistryEngine,
        make_fault_proxy: Callable[[str], FaultProxy]) -> None:
    # A registry that sends RateLimit headers counts manifest GETs (as Docker Hub does, which is
    # known by name): whether a repository or tag exists is asked of its tag list instead.
    proxy = make_fault_proxy(src.host)
    proxy.add_rule(Rule(add_headers(METERED)))
    push_image(src_pusher, "lib/app")
    assert sync(engine, f"{proxy.host}/lib/app:v1", f"{dst.host}/m/app:v1").status == "synced"
    seen = len(proxy.requests)
    no_repo = sync(engine, f"{proxy.host}/lib/nope:1.99", f"{dst.host}/m/nope:1.99")
    no_tag = sync(engine, f"{proxy.host}/lib/app:v9.9", f"{dst.host}/m/app:v9.9")
    assert (no_repo.error_code, no_tag.error_code) == ("NAME_UNKNOWN", "MANIFEST_UNKNOWN")
    asked = [(r.method, r.path.split("?")[0]) for r in proxy.requests[seen:]]
    assert [a for a in asked if "/manifests/" in a[1]] == [("HEAD", "/v2/lib/nope/manifests/1.99"),
                                                          ("HEAD", "/v2/lib/app/manifests/v9.9")]


def test_manifest_body_cut_is_retried(src: Registry, dst: Registry, src_pusher: Pusher,
                                      engine: RegistryEngine) -> None:
    img = push_image(src_pusher, "lib/app", archs=("amd64", "arm64"))
    with FaultProxy(src.host) as proxy:
        # The first manifest GET loses its connection part way through the body.
        proxy.add_rule(Rule(DropAfter(100), method="GET", path_re="/manifests/", times=1))
        r = sync(engine, f"{proxy.host}/lib/app:v1", f"{dst.host}/m/app:v1")
        cut = [s for s in proxy.requests if s.method == "GET" and "/manifests/" in s.path and s.faults]
        assert len(cut) == 1
    assert r.status == "synced", r.error
    assert dst.manifest_digest("m/app", "v1") == img.digest

# -- a hand-written registry for answers real ones will not give ------------------------------


class _Fake(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, dict[str, str], bytes]]

    def _reply(self, body: bool) -> None:
        status, headers, data = self.routes.get(self.path, (404, {}, b'{"errors":[{"code":"NAME_UNKNOWN"}]}'))
        self.send_response(status)
        for k, v in {"Content-Length": str(len(data)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._reply(True)

    def do_HEAD(self) -> None:
        self._reply(False)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake() -> Iterator[tuple[str, dict[str, tuple[int, dict[str, str], bytes]]]]:
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_Fake,), {"routes": routes}))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"127.0.0.1:{server.server_address[1]}", routes
    server.shutdown()
    server.server_close()


def _serve_manifest(routes: dict[str, tuple[int, dict[str, str], bytes]], tag: str, body: bytes,
                    ctype: str, extra: dict[str, str] | None = None) -> None:
    headers = {"Content-Type": ctype, **(extra or {})}
    routes[f"/v2/lib/x/manifests/{tag}"] = (200, headers, body)


def test_unusable_manifests_are_refused(fake: tuple[str, dict[str, tuple[int, dict[str, str], bytes]]],
                                        dst: Registry, engine: RegistryEngine) -> None:
    host, routes = fake
    schema1 = json.dumps({"schemaVersion": 1, "name": "lib/x", "tag": "old", "fsLayers": []}).encode()
    _serve_manifest(routes, "old", schema1, "application/vnd.docker.distribution.manifest.v1+prettyjws",
                    {"Docker-Content-Digest": sha(schema1)})
    huge = b'{"schemaVersion":2,"mediaType":"' + OCI_MANIFEST.encode() + b'","x":"' + b"a" * (5 << 20) + b'"}'
    _serve_manifest(routes, "huge", huge, OCI_MANIFEST)  # no digest header: costs a GET, which is capped
    _serve_manifest(routes, "broken", b'{"schemaVersion": 2, "layers": [', OCI_MANIFEST,
                    {"RateLimit-Limit": "100;w=21600", "RateLimit-Remaining": "3;w=21600"})
    cases = {"old": "schema 1", "huge": "limit", "broken": "not valid JSON"}
    for tag, words in cases.items():
        r = sync(engine, f"{host}/lib/x:{tag}", f"{dst.host}/m/x:{tag}")
        assert r.status == "failed" and not r.temporary and r.error_code == "ManifestError", r
        # The reason alone: the image is named once, by whoever shows the result.
        assert words in (r.error or "") and host not in (r.error or ""), r.error
    assert r.warnings == [f"{host} pull quota nearly spent: 3 of 100 left"]
    assert not [p for m, p, _ in requests(dst) if m in ("PUT", "POST")]


def test_undecodable_manifest_body_is_a_typed_failure(
        fake: tuple[str, dict[str, tuple[int, dict[str, str], bytes]]], dst: Registry,
        engine: RegistryEngine) -> None:
    host, routes = fake
    _serve_manifest(routes, "gz", b"not gzip at all" * 10, OCI_MANIFEST, {"Content-Encoding": "gzip"})
    r = sync(engine, f"{host}/lib/x:gz", f"{dst.host}/m/x:gz")
    assert r.status == "failed" and r.error_code == "TransportError" and r.temporary, r
    assert "could not be decoded" in (r.error or "")


def test_manifest_not_matching_its_digest_is_refused(
        fake: tuple[str, dict[str, tuple[int, dict[str, str], bytes]]], dst: Registry,
        engine: RegistryEngine) -> None:
    host, routes = fake
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
    claimed = "sha256:" + "ab" * 32
    routes[f"/v2/lib/x/manifests/{claimed}"] = (200, {"Content-Type": OCI_INDEX,
                                                      "Docker-Content-Digest": claimed}, body)
    r = sync(engine, f"{host}/lib/x@{claimed}", f"{dst.host}/m/x:v1")
    assert r.status == "failed" and r.error_code == "ManifestError" and "hashes to" in (r.error or "")


def test_token_authenticated_destination(src: Registry, src_pusher: Pusher,
                                         make_registry: Callable[..., Registry], tmp_path: Path) -> None:
    img = push_image(src_pusher, "lib/app", archs=("amd64", "arm64"), layer_size=200_000)
    with TokenServer(tmp_path / "token", users={"pusher": "pw"},
                     acl={"pusher": {"m/*": ["pull", "push"]}}) as ts:
        reg = make_registry("tok", token=ts.registry_token)
        keychain = StaticKeychain({reg.host: Credential(username="pusher", password="pw")})
        eng = RegistryEngine(RegistryOptions(chunk_size=64 * 1024, retry_attempts=2, retry_base_delay=0.01),
                             keychain=keychain)
        try:
            # Streamed PATCH bodies cannot be replayed after a 401: each upload's POST earns the token.
            r = sync(eng, f"{src.host}/lib/app:v1", f"{reg.host}/m/a:v1", f"{reg.host}/m/b:v1")
            assert r.status == "synced", r.error
            assert r.destinations[1].blobs_mounted == len(img.blobs)
            assert any("repository:m/a:pull" in s for q in ts.issued() for s in q.scopes)
            denied = sync(eng, f"{src.host}/lib/app:v1", f"{reg.host}/other/app:v1")
            assert denied.status == "failed" and not denied.temporary
            assert denied.error_code in ("UNAUTHORIZED", "DENIED")
        finally:
            eng.close()
        with httpx.Client(auth=RegistryAuth(reg.host, keychain)) as c:
            r2 = c.head(f"{reg.url}/v2/m/b/manifests/v1", headers={"Accept": ACCEPT})
            assert r2.headers["Docker-Content-Digest"] == img.digest


def test_a_mirror_missing_a_blob_sends_that_destination_to_the_origin(
    make_registry: Callable[..., Registry], src: Registry, dst: Registry, src_pusher: Pusher,
) -> None:
    img = push_image(src_pusher, "lib/mirrored", layers=2)
    mirror = make_registry("mirror")
    with httpx.Client() as c:
        push_image(Pusher(mirror.url, client=c), "lib/mirrored", layers=2)
        # The mirror holds the manifest but has lost a layer.
        assert c.delete(f"{mirror.url}/v2/lib/mirrored/blobs/{img.blobs[1]}").status_code == 202
    e = RegistryEngine(RegistryOptions(retry_attempts=2, retry_base_delay=0.01, retry_max_delay=0.02,
                                       mirrors={src.host: [mirror.host]}))
    try:
        # Progress also counts what the failed pass through the mirror moved: no progress check here.
        r = e.sync(SyncJob(batch_id="b", source=f"{src.host}/lib/mirrored:v1",
                           destinations=[f"{dst.host}/m/mirrored:v1"]), lambda n: None)
    finally:
        e.close()
    assert r.status == "synced", r.error
    assert dst.manifest_digest("m/mirrored", "v1") == img.digest
    assert all(dst.has_blob("m/mirrored", b) for b in img.blobs)
