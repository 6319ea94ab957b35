"""Blob transfers between real registries: chunking, resuming, verification, memory, dedup."""

from __future__ import annotations

import hashlib
import http.server
import random
import re
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from config.reference import Reference
from tests.support.faultproxy import Corrupt, DropAfter, FaultProxy, Hangup, Rule
from tests.support.images import Pusher, push_random_blob
from tests.support.registry import Registry
from workers.engine.blobs import BlobCopier
from workers.engine.cache import BlobCache, CachePolicy
from workers.engine.errors import DigestMismatch
from workers.engine.manifests import Descriptor
from workers.engine.retry import RetryPolicy
from workers.engine.transport import RegistryTransport

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def requests(reg: Registry) -> list[tuple[str, str, int]]:
    """(method, path, status) for every request in the registry's access log."""
    return [(m, p, int(s)) for m, p, s in re.findall(r'"([A-Z]+) (\S+) HTTP/1\.1" (\d{3})', reg.log())]


@pytest.fixture
def transport() -> Iterator[RegistryTransport]:
    t = RegistryTransport(retry=RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05))
    yield t
    t.close()


def put_blob(pusher: Pusher, repo: str, size: int, seed: str = "b") -> Descriptor:
    data = random.Random(seed).randbytes(size)
    return Descriptor(LAYER, pusher.blob(repo, data), size)


def ref(reg: Registry | FaultProxy, repo: str) -> Reference:
    return Reference.parse(f"{reg.host}/{repo}:x")


def test_chunked_upload_verifies_then_commits(src: Registry, dst: Registry, src_pusher: Pusher,
                                              transport: RegistryTransport) -> None:
    desc = put_blob(src_pusher, "a/b", 300_000)
    moved: list[int] = []
    lock = threading.Lock()

    def progress(n: int) -> None:
        with lock:
            moved.append(n)

    copier = BlobCopier(transport, chunk_size=100_000)
    res = copier.copy(ref(src, "a/b"), ref(dst, "c/d"), desc, progress)
    assert (res.action, res.uploaded, res.downloaded) == ("copied", 300_000, 300_000)
    assert sum(moved) == 300_000
    assert dst.has_blob("c/d", desc.digest)
    log = requests(dst)
    assert sum(1 for m, p, _ in log if m == "PATCH") == 3
    assert [m for m, p, _ in log if m in ("POST", "PATCH", "PUT")][-1] == "PUT"
    # Second time: HEAD finds it, nothing moves.
    again = copier.copy(ref(src, "a/b"), ref(dst, "c/d"), desc)
    assert again.action == "skipped" and again.uploaded == 0


def test_source_drop_resumes_with_range(src: Registry, dst: Registry, src_pusher: Pusher,
                                        transport: RegistryTransport) -> None:
    size = 400_000
    desc = put_blob(src_pusher, "a/b", size)
    with FaultProxy(src.host) as proxy:
        # Every response is cut at 60%: only a client that resumes from the offset can finish.
        proxy.add_rule(Rule(DropAfter(int(size * 0.6)), method="GET", path_re="/blobs/sha256:"))
        res = BlobCopier(transport).copy(ref(proxy, "a/b"), ref(dst, "c/d"), desc)
        assert proxy.count("GET", "/blobs/sha256:") == 2
        assert proxy.errors == []
    assert res.action == "copied" and res.downloaded == size
    assert dst.has_blob("c/d", desc.digest)


def test_destination_hangup_resyncs_the_upload(src: Registry, dst: Registry, src_pusher: Pusher,
                                               transport: RegistryTransport) -> None:
    desc = put_blob(src_pusher, "a/b", 250_000)
    with FaultProxy(dst.host) as proxy:
        proxy.add_rule(Rule(Hangup(), method="PATCH", times=1))
        res = BlobCopier(transport, chunk_size=100_000).copy(ref(src, "a/b"), ref(proxy, "c/d"), desc)
        assert proxy.count("PATCH") >= 4  # the cut one, then three that landed
        # The registry was asked where the upload stood before continuing.
        assert proxy.count("GET", "/blobs/uploads/") >= 1
    assert res.action == "copied"
    assert dst.has_blob("c/d", desc.digest)


def test_corrupt_source_is_never_committed(src: Registry, dst: Registry, src_pusher: Pusher,
                                           transport: RegistryTransport) -> None:
    desc = put_blob(src_pusher, "a/b", 200_000)
    with FaultProxy(src.host) as proxy:
        proxy.add_rule(Rule(Corrupt(150_000), method="GET", path_re="/blobs/sha256:"))
        with pytest.raises(DigestMismatch) as info:
            BlobCopier(transport, chunk_size=64_000).copy(ref(proxy, "a/b"), ref(dst, "c/d"), desc)
    assert not info.value.temporary
    assert "hashes to" in str(info.value)
    assert not dst.has_blob("c/d", desc.digest)
    log = requests(dst)
    assert not any(m == "PUT" for m, _, _ in log)  # no commit was even attempted
    assert any(m == "DELETE" and "/blobs/uploads/" in p for m, p, _ in log)  # session cancelled


def test_size_disagreeing_with_descriptor_is_refused(src: Registry, dst: Registry, src_pusher: Pusher,
                                                     transport: RegistryTransport) -> None:
    real = put_blob(src_pusher, "a/b", 50_000)
    copier = BlobCopier(transport)
    with pytest.raises(DigestMismatch, match="hashes to"):
        copier.copy(ref(src, "a/b"), ref(dst, "c/d"), Descriptor(LAYER, real.digest, 40_000))
    with pytest.raises(DigestMismatch, match="shorter"):
        copier.copy(ref(src, "a/b"), ref(dst, "c/d"), Descriptor(LAYER, real.digest, 60_000))
    assert not dst.has_blob("c/d", real.digest)


def test_large_blob_streams_in_bounded_memory(src: Registry, dst: Registry, transport: RegistryTransport) -> None:
    size = 50 * 1024 * 1024
    digest = push_random_blob(src.url, "big/blob", size, seed=7)
    desc = Descriptor(LAYER, digest, size)
    tracemalloc.start()
    try:
        res = BlobCopier(transport, chunk_size=16 * 1024 * 1024).copy(
            ref(src, "big/blob"), ref(dst, "big/blob"), desc)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res.action == "copied" and res.uploaded == size
    assert peak < 12 * 1024 * 1024, f"peak {peak} bytes while copying a {size}-byte blob"
    assert dst.has_blob("big/blob", digest)


def test_same_digest_is_never_uploaded_twice_at_once(src: Registry, dst: Registry, src_pusher: Pusher,
                                                     transport: RegistryTransport) -> None:
    desc = put_blob(src_pusher, "a/b", 2_000_000)
    copier = BlobCopier(transport)
    results: list[str] = []
    barrier = threading.Barrier(3)

    def run() -> None:
        barrier.wait()
        results.append(copier.copy(ref(src, "a/b"), ref(dst, "c/d"), desc).action)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["copied", "skipped", "skipped"]
    assert sum(1 for m, p, _ in requests(src) if m == "GET" and "/blobs/" in p) == 1


def test_refused_mount_cancels_its_session_and_uploads(src: Registry, dst: Registry, src_pusher: Pusher,
                                                       transport: RegistryTransport) -> None:
    desc = put_blob(src_pusher, "a/b", 10_000)
    copier = BlobCopier(transport)
    copier.tracker.note(dst.host, desc.digest, "never/had-it")  # a stale memory
    res = copier.copy(ref(src, "a/b"), ref(dst, "c/d"), desc)
    assert res.action == "copied"
    log = requests(dst)
    assert any(m == "POST" and "mount=" in p and s == 202 for m, p, s in log)
    assert any(m == "DELETE" and "/blobs/uploads/" in p for m, p, _ in log)


def test_node_cache_is_filled_and_then_used(src: Registry, dst: Registry, src_pusher: Pusher,
                                            make_registry: Callable[..., Registry],
                                            transport: RegistryTransport, tmp_path: Path) -> None:
    desc = put_blob(src_pusher, "a/b", 300_000)
    cache = BlobCache(tmp_path / "cache", CachePolicy())
    copier = BlobCopier(transport, chunk_size=128_000, cache=cache)
    first = copier.copy(ref(src, "a/b"), ref(dst, "c/d"), desc)
    assert first.downloaded == 300_000
    cached = cache.get(desc.digest)
    assert cached is not None and hashlib.sha256(cached.read_bytes()).hexdigest() == desc.digest[7:]
    src.stop()  # the second destination must be served from the cache alone
    other = make_registry("other")
    second = copier.copy(ref(src, "a/b"), ref(other, "c/d"), desc)
    assert (second.action, second.downloaded, second.uploaded) == ("copied", 0, 300_000)
    assert other.has_blob("c/d", desc.digest)


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[dict[str, str]]
    target: str

    def do_GET(self) -> None:
        self.seen.append(dict(self.headers))
        if self.target:
            self.send_response(307)
            self.send_header("Location", self.target + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"bytes")

    def log_message(self, *args: object) -> None:
        pass


def _serve(target: str, seen: list[dict[str, str]]) -> http.server.ThreadingHTTPServer:
    handler = type("H", (_Recorder,), {"seen": seen, "target": target})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_redirects_do_not_carry_registry_credentials(transport: RegistryTransport) -> None:
    storage_seen: list[dict[str, str]] = []
    registry_seen: list[dict[str, str]] = []
    storage = _serve("", storage_seen)
    registry = _serve(f"http://127.0.0.1:{storage.server_address[1]}", registry_seen)
    try:
        host = f"127.0.0.1:{registry.server_address[1]}"
        r = transport.send("GET", host, "/v2/a/blobs/sha256:" + "0" * 64,
                           headers={"Authorization": "Bearer registry-token"})
        assert r.content == b"bytes"
    finally:
        for s in (storage, registry):
            s.shutdown()
            s.server_close()
    assert registry_seen[0].get("Authorization") == "Bearer registry-token"
    assert "Authorization" not in storage_seen[0]
    assert storage_seen[0]["User-Agent"].startswith("ferry/")
