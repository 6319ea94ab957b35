"""The Redis coordinator against a real redis-server: ledger, leases, limits, quota pauses."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from config.jobs import SyncJob
from contract import keys
from tests.support.faultproxy import FaultProxy, Rule, max_in_window, too_many_requests
from tests.support.images import Pusher, push_image
from tests.support.procs import stop, wait_until
from tests.support.redis import RedisServer
from tests.support.registry import Registry
from tests.support.tokenserver import TokenServer
from workers.cluster.coordinator import PAUSE_RECHECK, RedisCoordinator
from workers.cluster.ratelimit import Limit
from workers.engine.auth import RegistryAuth
from workers.engine.keychain import ChainKeychain, Credential, RotatingKeychain, StaticKeychain
from workers.engine.protocols import Coordinator
from workers.engine.registry import RegistryEngine, RegistryOptions
from workers.engine.throttle import quota_reset

ROOT = Path(__file__).resolve().parent.parent
DIGEST = "sha256:" + "ab" * 32


def lease_holder(c: RedisCoordinator, key: str) -> str:
    """Who holds a lease, as its value in Redis says ("" when nobody does)."""
    value = c.client.get(key)
    return value.decode() if value else ""


@pytest.fixture
def coords(redis_server: RedisServer) -> Iterator[list[RedisCoordinator]]:
    made: list[RedisCoordinator] = []

    def make(**kw: object) -> RedisCoordinator:
        made.append(RedisCoordinator.from_url(redis_server.url, **kw))
        return made[-1]

    yield make  # type: ignore[misc]
    for c in made:
        c.close()


def test_is_a_coordinator(coords) -> None:  # type: ignore[no-untyped-def]
    c: Coordinator = coords(owner="a")
    assert c.known_locations("127.0.0.1:5000", DIGEST) == []


def test_ledger_records_forgets_and_expires(coords) -> None:  # type: ignore[no-untyped-def]
    a, b = coords(owner="a", ledger_ttl=1.0), coords(owner="b", ledger_ttl=1.0)
    a.record_blob("127.0.0.1:5000", "mirror/one", DIGEST)
    time.sleep(0.01)
    a.record_blob("127.0.0.1:5000", "mirror/two", DIGEST)
    # Another worker sees it, newest first; other registries and digests are separate.
    assert b.known_locations("127.0.0.1:5000", DIGEST) == ["mirror/two", "mirror/one"]
    assert b.known_locations("127.0.0.1:5001", DIGEST) == []
    b.forget_blob("127.0.0.1:5000", "mirror/two", DIGEST)
    assert a.known_locations("127.0.0.1:5000", DIGEST) == ["mirror/one"]
    # Docker Hub's names are one registry.
    a.record_blob("registry-1.docker.io", "library/x", DIGEST)
    assert b.known_locations("docker.io", DIGEST) == ["library/x"]
    time.sleep(1.1)
    assert b.known_locations("127.0.0.1:5000", DIGEST) == []


def test_lease_waiter_skips_after_a_successful_holder(coords) -> None:  # type: ignore[no-untyped-def]
    a, b = coords(owner="a", lease_ttl=2.0), coords(owner="b", lease_ttl=2.0)
    got: list[bool] = []
    with a.upload_lease("r", DIGEST) as held:
        assert held
        t = threading.Thread(target=lambda: got.append(b.upload_lease("r", DIGEST).__enter__()))
        t.start()
        time.sleep(3.0)  # longer than the TTL: the holder's renewals keep it
        assert got == []
    t.join(5)
    assert got == [False]


def test_lease_passes_on_after_a_failed_holder(coords, redis_server: RedisServer) -> None:  # type: ignore[no-untyped-def]
    a, b = coords(owner="a", lease_ttl=5.0), coords(owner="b", lease_ttl=5.0)
    got: list[tuple[bool, float]] = []
    t0 = time.monotonic()

    def wait() -> None:
        with b.upload_lease("r", DIGEST) as held:
            got.append((held, time.monotonic() - t0))

    def gets(raw: Any) -> int:
        return int(raw.info("commandstats").get("cmdstat_get", {}).get("calls", 0))

    with pytest.raises(RuntimeError), a.upload_lease("r", DIGEST) as held, redis_server.client() as raw:
        assert held
        before = gets(raw)
        t = threading.Thread(target=wait)
        t.start()
        # b is waiting: it has looked at the held lease again and again.
        wait_until(lambda: gets(raw) >= before + 3, 5, "the second worker waiting on the lease")
        raise RuntimeError("upload failed")
    t.join(5)
    assert got and got[0][0] is True and got[0][1] < 2.0  # at once, not after the TTL


def test_dead_holder_lease_expires_and_is_taken_over(coords, redis_server: RedisServer,
                                                     tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    script = (
        "import sys, time\n"
        "from workers.cluster.coordinator import RedisCoordinator\n"
        "c = RedisCoordinator.from_url(sys.argv[1], owner='doomed', lease_ttl=2.0)\n"
        "with c.upload_lease('r', sys.argv[2]):\n"
        "    print('held', flush=True); time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, redis_server.url, DIGEST], cwd=ROOT,
                            stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"held"
        b = coords(owner="b", lease_ttl=2.0)
        key = keys.blob_lease("r", DIGEST)
        time.sleep(2.5)  # alive past its TTL: renewed
        assert lease_holder(b, key).startswith("doomed:")
        stop(proc, signal.SIGKILL)
        killed = time.monotonic()
        with b.upload_lease("r", DIGEST) as held:
            took = time.monotonic() - killed
            assert held and lease_holder(b, key).startswith("b:")
        assert took <= 2.0 + 0.5
    finally:
        stop(proc, signal.SIGKILL)
        if proc.stdout:
            proc.stdout.close()


def test_manifest_lease_serialises_writers_of_one_tag(coords) -> None:  # type: ignore[no-untyped-def]
    a, b = coords(owner="a"), coords(owner="b")
    inside: list[int] = []
    peak: list[int] = []
    lock = threading.Lock()

    def push(c: RedisCoordinator) -> None:
        for _ in range(3):
            with c.manifest_lease("r", "mirror/app", "v1") as held:
                if not held:
                    continue  # pushed by the holder we waited for
                with lock:
                    inside.append(1)
                    peak.append(len(inside))
                time.sleep(0.05)
                with lock:
                    inside.pop()

    ts = [threading.Thread(target=push, args=(c,)) for c in (a, b, a, b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(20)
    assert max(peak) == 1 and len(peak) >= 3  # holders never overlap


def test_rate_and_concurrency_limits_hold_across_coordinators(coords) -> None:  # type: ignore[no-untyped-def]
    limits = {"127.0.0.1:5000": Limit(max_concurrency=2, requests_per_second=5.0)}
    cs = [coords(owner=f"w{i}", limits=limits) for i in range(3)]
    starts: list[float] = []
    inflight = [0]
    peak = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + 4.0

    def hammer(c: RedisCoordinator) -> None:
        while time.monotonic() < deadline:
            with c.acquire("127.0.0.1:5000"):
                with lock:
                    starts.append(time.monotonic())
                    inflight[0] += 1
                    peak[0] = max(peak[0], inflight[0])
                time.sleep(0.02)
                with lock:
                    inflight[0] -= 1

    ts = [threading.Thread(target=hammer, args=(c,)) for c in cs for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(15)
    assert peak[0] <= 2
    assert max_in_window(starts, 2.0) <= 11  # 5/s, one token of burst
    assert len(starts) >= 4 * 5 * 0.9
    # Docker Hub gets a conservative default.
    assert cs[0].limiter.limits["docker.io"] == Limit(max_concurrency=16, requests_per_second=10.0)


def test_slots_of_a_dead_worker_come_back(coords, redis_server: RedisServer) -> None:  # type: ignore[no-untyped-def]
    limits = {"r": Limit(max_concurrency=1)}
    a = coords(owner="a", limits=limits, lease_ttl=1.0)  # slot TTL: 10 s floor
    with redis_server.client() as raw:
        raw.zadd(keys.slots("r"), {"ghost": int(time.time() * 1000) + 500})
    t0 = time.monotonic()
    with a.acquire("r"):
        assert 0.3 < time.monotonic() - t0 < 2.0


def test_quota_pause_stops_every_worker_until_reset(coords) -> None:  # type: ignore[no-untyped-def]
    a, b = coords(owner="a"), coords(owner="b")
    reset = time.time() + 1.5
    a.report_quota("registry-1.docker.io", 0, reset)
    assert b.pause_until("docker.io") == pytest.approx(reset, abs=0.01)
    with b.acquire("docker.io"):
        assert time.time() >= reset - 0.01
    assert a.pause_until("docker.io") is None


def test_spent_credential_rotates_to_the_next(coords) -> None:  # type: ignore[no-untyped-def]
    counts = {"docker.io": 2}
    a, b = coords(owner="a", credential_counts=counts), coords(owner="b", credential_counts=counts)
    assert b.credential_index("docker.io") == 0
    a.report_quota("docker.io", 0, time.time() + 60)
    # The next credential is fresh: nobody waits, everyone switches (others within PAUSE_RECHECK).
    assert a.credential_index("docker.io") == 1
    wait_until(lambda: b.credential_index("docker.io") == 1, 2 * PAUSE_RECHECK + 1, "b to switch")
    assert b.pause_until("docker.io") is None
    b.report_quota("docker.io", 0, time.time() + 60)
    # Both spent: stay and wait for the reset.
    assert a.credential_index("docker.io") == 1
    assert a.pause_until("docker.io") is not None


def test_coordination_fails_open_without_redis(coords, redis_server: RedisServer) -> None:  # type: ignore[no-untyped-def]
    a = coords(owner="a", limits={"r": Limit(max_concurrency=1, requests_per_second=1)})
    redis_server.stop()
    assert a.known_locations("r", DIGEST) == []
    a.record_blob("r", "x", DIGEST)
    with a.upload_lease("r", DIGEST) as held:
        assert held
    with a.acquire("r"):
        pass
    assert a.pause_until("r") is None


def _response(status: int, headers: dict[str, str]) -> httpx.Response:
    return httpx.Response(status, headers=headers)


def test_quota_headers() -> None:
    now = 1000.0
    assert quota_reset(_response(200, {"RateLimit-Remaining": "50;w=21600"}), 1, now) is None
    assert quota_reset(_response(200, {}), 1, now) is None
    assert quota_reset(_response(429, {"Retry-After": "10"}), 1, now) == (None, 1010.0)
    assert quota_reset(_response(200, {"RateLimit-Remaining": "0;w=21600",
                                       "RateLimit-Limit": "100;w=21600"}), 1, now) == (0, 22600.0)
    assert quota_reset(_response(200, {"RateLimit-Remaining": "3", "RateLimit-Reset": "30"}), 5, now) == \
        (3, 1030.0)
    assert quota_reset(_response(429, {"RateLimit-Reset": "1700000000"}), 1, now) == (None, 1700000000.0)
    assert quota_reset(_response(429, {}), 1, now) == (None, 1002.0)


def test_a_blob_the_ledger_lists_but_the_registry_dropped_is_copied_again(
    coords, src: Registry, dst: Registry, src_pusher: Pusher,  # type: ignore[no-untyped-def]
) -> None:
    img = push_image(src_pusher, "lib/gc", layers=2)
    engine = RegistryEngine(RegistryOptions(retry_attempts=2, retry_base_delay=0.01, retry_max_delay=0.02),
                            coordinator=coords(owner="gc"))
    try:
        job = SyncJob(batch_id="b", source=f"{src.host}/lib/gc:v1", destinations=[f"{dst.host}/m/gc:v1"])
        assert engine.sync(job, lambda n: None).status == "synced"
        # The registry loses a layer and the image (garbage collection); the ledger still lists it.
        layer = img.blobs[1]
        with httpx.Client() as c:
            assert c.delete(f"{dst.url}/v2/m/gc/manifests/{img.digest}").status_code == 202
            assert c.delete(f"{dst.url}/v2/m/gc/blobs/{layer}").status_code == 202
        assert not dst.has_blob("m/gc", layer)
        again = engine.sync(job, lambda n: None)
        assert again.status == "synced", again.error
        assert dst.has_blob("m/gc", layer)
        assert dst.manifest_digest("m/gc", "v1") == img.digest
    finally:
        engine.close()


def test_a_spent_credential_is_swapped_for_the_next_one(
    coords, tmp_path: Path, make_registry: Callable[..., Registry],  # type: ignore[no-untyped-def]
    make_fault_proxy: Callable[[str], FaultProxy],
) -> None:
    users = {"admin": "admin-pw", "first": "first-pw", "second": "second-pw"}
    with TokenServer(tmp_path / "tokens", users=users, acl={u: {"*": "*"} for u in users}) as ts:
        reg = make_registry("tok", token=ts.registry_token)
        admin = StaticKeychain({reg.host: Credential("admin", "admin-pw")})
        with httpx.Client(auth=RegistryAuth(reg.host, admin), timeout=30) as c:
            push_image(Pusher(reg.url, client=c), "lib/rot", layers=1)
        proxy = make_fault_proxy(reg.host)
        # The first credential's quota runs out on its first blob read, which carries its token (the
        # first manifest read may be the unauthenticated one the registry answers with a challenge).
        proxy.add_rule(Rule(too_many_requests("1"), method="GET", path_re="/blobs/", times=1))
        coord = coords(owner="rot", credential_counts={proxy.host: 2})
        rotating = RotatingKeychain(
            {proxy.host: [Credential("first", "first-pw"), Credential("second", "second-pw")]}, coord.credential_index)
        keychain = ChainKeychain(rotating, admin)
        engine = RegistryEngine(RegistryOptions(retry_attempts=3, retry_base_delay=0.01, retry_max_delay=0.02),
                                keychain=keychain, coordinator=coord)
        try:
            job = SyncJob(batch_id="b", source=f"{proxy.host}/lib/rot:v1", destinations=[f"{reg.host}/m/rot:v1"])
            ts.clear()
            result = engine.sync(job, lambda n: None)
        finally:
            engine.close()
        assert result.status == "synced", result.error
        assert coord.credential_index(proxy.host) == 1
        users_seen = [s.user for s in ts.issued() if s.user != "admin"]  # admin writes the destination
        assert users_seen[0] == "first" and "second" in users_seen


def test_a_late_report_for_a_rotated_credential_does_not_pause_the_new_one(coords) -> None:  # type: ignore[no-untyped-def]
    counts = {"docker.io": 2}
    a, b = coords(owner="a", credential_counts=counts), coords(owner="b", credential_counts=counts)
    assert a.credential_index("docker.io") == b.credential_index("docker.io") == 0
    a.report_quota("docker.io", 0, time.time() + 60)
    # b's request was refused under credential 0 as well, reported just after a rotated away from it.
    b.report_quota("docker.io", 0, time.time() + 60)
    assert b.credential_index("docker.io") == 1
    assert a.pause_until("docker.io") is None
    assert b.pause_until("docker.io") is None


def test_redis_lost_during_a_request_does_not_fail_it(coords, redis_server: RedisServer) -> None:  # type: ignore[no-untyped-def]
    a = coords(owner="a", limits={"r": Limit(max_concurrency=1)})
    with a.acquire("r"), a.upload_lease("r", DIGEST) as held:
        assert held
        redis_server.stop()
