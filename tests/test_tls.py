"""TLS to registries for real: docker-registry serving HTTPS with a certificate from a private CA (and
requiring client certificates for mTLS), copied to by the registry engine and by real workers.

The rules under test (workers/engine/tls.py): ``insecure`` tries HTTPS unverified and falls back to
plain HTTP only when the server does not speak TLS; ``ca_file``/``client_cert`` mean verified HTTPS;
loopback without either is plain HTTP; everything else is HTTPS verified against the default CAs.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from config.jobs import SyncJob, SyncResult
from config.settings import FerrySettings
from tests.support.images import Image, Pusher, push_image
from tests.support.procs import wait_until
from tests.support.registry import Registry
from tests.support.tls import PrivateCA, non_loopback_addresses
from tests.support.tokenserver import TokenServer
from tests.support.workers import ROOT, ferry_env, run_producer
from workers import runtime
from workers.engine.keychain import Credential, StaticKeychain
from workers.engine.registry import RegistryEngine, RegistryOptions
from workers.engine.tls import TlsConfig, TlsPolicy, client_context

# A certificate failure must come back at once, not after the retry budget (6 attempts with backoff).
FAST_FAILURE_S = 3.0


class Counting:
    """An engine observer counting requests that got no answer and retries."""

    def __init__(self) -> None:
        self.unanswered = 0
        self.retries = 0
        self._lock = threading.Lock()

    def request(self, registry: str, code: int) -> None:
        if code == 0:
            with self._lock:
                self.unanswered += 1

    def retry(self) -> None:
        with self._lock:
            self.retries += 1

    def quota_pause(self, registry: str, until: float) -> None:
        pass


@pytest.fixture
def ca(tmp_path: Path) -> PrivateCA:
    return PrivateCA(tmp_path / "ca")


@pytest.fixture
def image(src: Registry, src_pusher: Pusher) -> Image:
    return push_image(src_pusher, "lib/app", layers=2, layer_size=48 * 1024, archs=("amd64", "arm64"))


def outside_address() -> str:
    found = non_loopback_addresses()
    if not found:
        pytest.skip("this machine has no non-loopback IPv4 address to serve a registry on")
    return found[0]


def tls_registry(make_registry: Callable[..., Registry], ca: PrivateCA, address: str = "127.0.0.1",
                 mtls: bool = False) -> Registry:
    return make_registry("tls", address=address, tls=ca.server(address, "localhost", stem=f"server-{address}"),
                         client_cas=(ca.ca_file,) if mtls else (),
                         ssl_context=ca.context(ca.client(stem="reader") if mtls else None))


def sync(src: Registry, dst: Registry, tls: dict[str, TlsConfig] | None = None, insecure: tuple[str, ...] = (),
         observer: Counting | None = None, keychain: StaticKeychain | None = None) -> tuple[SyncResult, float]:
    engine = RegistryEngine(RegistryOptions(tls=tls or {}, insecure_registries=insecure), keychain=keychain,
                            observer=observer)
    started = time.monotonic()
    try:
        result = engine.sync(SyncJob(batch_id="b", source=f"{src.host}/lib/app:v1",
                                     destinations=[f"{dst.host}/mirror/app:v1"]), lambda n: None)
    finally:
        engine.close()
    return result, time.monotonic() - started


def assert_copied(result: SyncResult, dst: Registry, image: Image) -> None:
    assert result.status == "synced", result.error
    assert result.destinations[0].digest == image.digest
    assert dst.manifest_digest("mirror/app", "v1") == image.digest
    assert all(dst.has_blob("mirror/app", b) for b in image.blobs)


def assert_certificate_failure(result: SyncResult, took: float, seen: Counting, *expected: str) -> None:
    assert result.status == "failed"
    assert result.error_code == "CertificateError" and not result.temporary, result
    for text in expected:
        assert text in (result.error or ""), result.error
    assert seen.retries == 0 and took < FAST_FAILURE_S, (seen.retries, took)


def test_without_the_ca_the_image_fails_fast_with_a_certificate_error(
        src: Registry, image: Image, make_registry: Callable[..., Registry], ca: PrivateCA) -> None:
    dst = tls_registry(make_registry, ca, outside_address())
    seen = Counting()
    result, took = sync(src, dst, observer=seen)
    assert_certificate_failure(result, took, seen, f"certificate verify failed for {dst.host}",
                               "unable to get local issuer certificate",
                               f"set ca_file for {dst.host} in FERRY_REGISTRIES")
    assert dst.manifest_digest("mirror/app", "v1") is None
    # The registry saw the refused handshake, and not a storm of them.
    wait_until(lambda: bool(dst.failed_handshakes()), 10, "the registry to log the refused handshake")
    assert len(dst.failed_handshakes()) <= 2, dst.failed_handshakes()


def test_another_ca_does_not_make_it_trusted(src: Registry, image: Image, make_registry: Callable[..., Registry],
                                            ca: PrivateCA, tmp_path: Path) -> None:
    dst = tls_registry(make_registry, ca)
    other = PrivateCA(tmp_path / "other", name="another CA")
    seen = Counting()
    result, took = sync(src, dst, tls={dst.host: TlsConfig(ca_file=str(other.ca_file))}, observer=seen)
    assert_certificate_failure(result, took, seen, "certificate verify failed", "set ca_file")


def test_ca_file_makes_it_copy_digest_exact(src: Registry, image: Image, make_registry: Callable[..., Registry],
                                           ca: PrivateCA) -> None:
    dst = tls_registry(make_registry, ca)
    result, _ = sync(src, dst, tls={dst.host: TlsConfig(ca_file=str(ca.ca_file))})
    assert_copied(result, dst, image)


def test_a_loopback_tls_registry_without_settings_gets_a_hint(
        src: Registry, image: Image, make_registry: Callable[..., Registry], ca: PrivateCA) -> None:
    dst = tls_registry(make_registry, ca)
    result, _ = sync(src, dst)
    assert result.status == "failed" and not result.temporary
    assert f"{dst.host} speaks only HTTPS" in (result.error or ""), result.error
    assert "set ca_file (or insecure)" in (result.error or "")


def test_mtls_refuses_without_a_client_certificate_and_works_with_one(
        src: Registry, image: Image, make_registry: Callable[..., Registry], ca: PrivateCA) -> None:
    dst = tls_registry(make_registry, ca, mtls=True)
    seen = Counting()
    result, took = sync(src, dst, tls={dst.host: TlsConfig(ca_file=str(ca.ca_file))}, observer=seen)
    assert_certificate_failure(result, took, seen, f"TLS refused by {dst.host}",
                               "requires a client certificate", "set client_cert and client_key")
    client = ca.client()
    result, _ = sync(src, dst, tls={dst.host: TlsConfig(ca_file=str(ca.ca_file), client_cert=str(client.cert),
                                                        client_key=str(client.key))})
    assert_copied(result, dst, image)


def test_insecure_speaks_tls_without_verifying(src: Registry, image: Image,
                                               make_registry: Callable[..., Registry], ca: PrivateCA) -> None:
    dst = tls_registry(make_registry, ca, outside_address())
    result, _ = sync(src, dst, insecure=(dst.host,))
    assert_copied(result, dst, image)
    # No plain HTTP request reached it, and no handshake failed.
    assert dst.failed_handshakes() == []


@pytest.mark.parametrize("where", ["loopback", "outside"])
def test_insecure_falls_back_to_plain_http_when_the_registry_does_not_speak_tls(
        where: str, src: Registry, image: Image, make_registry: Callable[..., Registry]) -> None:
    address = "127.0.0.1" if where == "loopback" else outside_address()
    dst = make_registry("plain", address=address)
    via_settings = {dst.host: TlsConfig(insecure=True)}
    result, _ = sync(src, dst, tls=via_settings)
    assert_copied(result, dst, image)


def test_a_token_realm_on_another_host_is_verified_with_that_hosts_settings(
        src: Registry, image: Image, make_registry: Callable[..., Registry], ca: PrivateCA, tmp_path: Path) -> None:
    served = ca.server("127.0.0.1", stem="token")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(served.cert, served.key)
    with TokenServer(tmp_path / "token", users={"pusher": "pw"}, acl={"pusher": {"mirror/*": ["pull", "push"]}},
                     tls=server_ctx) as ts:
        dst = make_registry("tok", token=ts.registry_token)
        keychain = StaticKeychain({dst.host: Credential(username="pusher", password="pw")})
        realm = f"127.0.0.1:{ts.port}"
        seen = Counting()
        result, took = sync(src, dst, keychain=keychain, observer=seen)
        assert_certificate_failure(result, took, seen, f"certificate verify failed for {realm}",
                                   f"set ca_file for {realm}")
        result, _ = sync(src, dst, keychain=keychain, tls={realm: TlsConfig(ca_file=str(ca.ca_file))})
        assert result.status == "synced", result.error
        assert ts.issued(), "no token was issued over TLS"
        assert result.destinations[0].digest == image.digest


def test_one_context_per_distinct_tls_setting(ca: PrivateCA) -> None:
    same = TlsConfig(ca_file=str(ca.ca_file))
    policy = TlsPolicy({"a.example:5443": same, "b.example:5443": TlsConfig(ca_file=str(ca.ca_file)),
                        "c.example:5443": TlsConfig(ca_file=str(ca.ca_file), insecure=True)})
    assert policy.context("a.example:5443") is policy.context("b.example:5443")
    assert policy.context("c.example:5443") is not policy.context("a.example:5443")
    # Hosts without settings, token realms among them, share the default context.
    assert policy.context("auth.example.com") is policy.context("registry.example.com") is client_context()


# ---- entry points: settings from the environment -------------------------------------------------

@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    yield ferry_env(None, tmp_path)


@pytest.mark.slow  # a real worker process (seconds to start): with the end-to-end suites
def test_a_missing_tls_file_stops_a_worker_as_bad_input(env: dict[str, str], ca: PrivateCA, tmp_path: Path) -> None:
    client = ca.client()
    missing = tmp_path / "nowhere" / "ca.pem"
    env["FERRY_REGISTRIES"] = json.dumps({"10.213.7.9:5443": {"ca_file": str(missing), "client_cert": str(client.cert),
                                                             "client_key": str(client.key)}})
    env["FERRY_BROKER_URL"] = "redis://127.0.0.1:1/0"
    p = subprocess.run([sys.executable, "-m", "workers"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2, p.stderr
    assert f"registry 10.213.7.9:5443: cannot read ca_file {missing}: No such file or directory" in p.stderr, \
        p.stderr


@pytest.mark.parametrize("case", ["missing client_cert", "missing client_key", "key of another certificate",
                                  "not a certificate"])
def test_unusable_tls_files_are_named_with_their_registry(case: str, ca: PrivateCA, tmp_path: Path) -> None:
    client, other = ca.client(), ca.client(stem="other")
    files = {"ca_file": str(ca.ca_file), "client_cert": str(client.cert), "client_key": str(client.key)}
    expected = {
        "missing client_cert": ("client_cert", str(tmp_path / "none.crt"), "cannot read client_cert"),
        "missing client_key": ("client_key", str(tmp_path / "none.key"), "cannot read client_key"),
        "key of another certificate": ("client_key", str(other.key), "do not make a usable certificate chain"),
        "not a certificate": ("ca_file", str(client.key), "holds no usable PEM certificate"),
    }
    field, path, words = expected[case]
    files[field] = path
    settings = FerrySettings(registries={"r.example:5443": files})
    with pytest.raises(ValueError) as e:
        runtime.tls_policy(settings).check()
    assert "FERRY_REGISTRIES: registry r.example:5443" in str(e.value) and words in str(e.value), str(e.value)
    assert path in str(e.value)


@pytest.mark.slow  # a real worker process (seconds to start): with the end-to-end suites
def test_a_missing_ca_file_stops_a_standalone_run_as_bad_input(env: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "ca.pem"
    env["FERRY_REGISTRIES"] = json.dumps({"r.example:5443": {"ca_file": str(missing)}})
    listing = tmp_path / "images.txt"
    listing.write_text("r.example:5443/lib/app:v1\n")
    p = run_producer(["enqueue", str(listing), "--target", "r.example:5443/m", "--wait"], env, timeout=120)
    assert p.returncode == 2, p.stderr
    assert f"registry r.example:5443: cannot read ca_file {missing}" in p.stderr, p.stderr


def test_a_client_key_without_a_certificate_is_bad_input(env: dict[str, str], tmp_path: Path) -> None:
    env["FERRY_REGISTRIES"] = json.dumps({"r.example:5443": {"client_key": str(tmp_path / "k.pem")}})
    p = run_producer(["enqueue", str(tmp_path / "none.txt"), "--target", "r.example:5443/m", "--wait"], env,
                     timeout=60)
    assert p.returncode == 2, p.stderr
    assert "FERRY_REGISTRIES__R.EXAMPLE:5443" in p.stderr and "client_key is set without client_cert" in p.stderr


@pytest.mark.slow  # a real worker process (seconds to start): with the end-to-end suites
def test_settings_flow_from_the_environment_to_a_real_worker(
        src: Registry, image: Image, make_registry: Callable[..., Registry], ca: PrivateCA, env: dict[str, str],
        tmp_path: Path) -> None:
    dst = tls_registry(make_registry, ca, mtls=True)
    client = ca.client()
    env["FERRY_REGISTRIES"] = json.dumps({dst.host: {"ca_file": str(ca.ca_file), "client_cert": str(client.cert),
                                                     "client_key": str(client.key)}})
    listing = tmp_path / "images.txt"
    listing.write_text(f"{src.host}/lib/app:v1\n")
    # Standalone: the producer starts its own Redis and a `python -m workers` with this environment.
    p = run_producer(["enqueue", str(listing), "--target", f"{dst.host}/mirror", "--wait"], env, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert dst.manifest_digest("mirror/lib/app", "v1") == image.digest
