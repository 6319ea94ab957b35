"""Bad input never half-runs: bad lists, options and settings exit 2 with one clear line and enqueue
nothing; a registry answering garbage fails that image and the worker carries on."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.cluster import Cluster, make_cluster_fixture  # noqa: F401  (fixture)
from tests.support.faultproxy import FaultProxy, Rule, status
from tests.support.images import OCI_MANIFEST, Pusher, push_image, sha
from tests.support.procs import free_port, wait_until
from tests.support.redis import RedisServer
from tests.support.registry import Registry
from tests.support.workers import ROOT, Worker, ferry_env, run_producer

pytestmark = pytest.mark.faults

TARGET = "127.0.0.1:5999/m"


def workers_cmd(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "workers", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def assert_nothing_enqueued(redis_server: RedisServer) -> None:
    with redis_server.client() as c:
        assert c.keys("*") == []


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize(("content", "expected"), [
    (b"nginx\nUPPER/Case:1\n", ["bad.txt:2:"]),
    (b"--frobnicate nginx\n", ["bad.txt:1:", "frobnicate"]),
    (b"--platform=linux/ nginx\nredis\n--platform=windows/amd64/v9/x redis:7\n", ["bad.txt:1:", "bad.txt:3:"]),
    (b"a/x:1 127.0.0.1:5999/m/y:1\nb/x:1 127.0.0.1:5999/m/y:1\n", ["bad.txt:2:", "127.0.0.1:5999/m/y:1"]),
    (b"nginx\n\xff\xfe redis\n", ["bad.txt:2:", "UTF-8"]),
    (b"a" * (1024 * 1024) + b"\n", ["bad.txt:1:", "bytes long"]),
    (b"# only comments\n\n   # and blanks\n", ["no images"]),
], ids=["reference", "option", "platform", "conflict", "non-utf8", "1MiB-line", "only-comments"])
def test_bad_lists_enqueue_nothing(tmp_path: Path, redis_server: RedisServer, content: bytes,
                                   expected: list[str]) -> None:
    listing = tmp_path / "bad.txt"
    listing.write_bytes(content)
    r = run_producer(["enqueue", str(listing), "--target", TARGET], ferry_env(redis_server.url, tmp_path))
    assert r.returncode == 2, r.stdout + r.stderr
    for text in expected:
        assert text in r.stderr, r.stderr
    assert "nothing was enqueued" in r.stderr
    assert len(r.stderr) < 4096, "a huge line must not be echoed whole"
    assert_nothing_enqueued(redis_server)


def test_hundred_thousand_lines_parse_fast_and_an_unreachable_broker_is_named(tmp_path: Path) -> None:
    listing = tmp_path / "big.txt"
    listing.write_text("".join(f"127.0.0.1:5000/team{i % 97}/app{i}:v{i % 7}\n" for i in range(100_000)))
    port = free_port()  # nothing listens there: connection refused
    t0 = time.monotonic()
    r = run_producer(["enqueue", str(listing), "--target", TARGET],
                     ferry_env(f"redis://127.0.0.1:{port}/0", tmp_path), timeout=120)
    took = time.monotonic() - t0
    print(f"\n100,000-line list parsed and mapped, broker refused: exit {r.returncode} after {took:.1f} s")
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"cannot reach the broker at redis://127.0.0.1:{port}" in one_error_line(r.stderr)
    assert took < 60


@pytest.mark.parametrize(("env", "args", "expected"), [
    ({"FERRY_BROKER_URL": "http://127.0.0.1:6379/0"}, [], "FERRY_BROKER_URL"),
    ({"FERRY_BROKER_URL": "redis://:pw-Zq81@127.0.0.1:notaport/0"}, [], "malformed port"),
    ({"FERRY_ENGINE": "foo"}, [], "FERRY_ENGINE"),
    ({}, ["--engine", "foo"], "invalid choice: 'foo'"),
    ({}, ["--bogus"], "unrecognized arguments: --bogus"),
    ({"FERRY_CONCURRENCY": "-1"}, [], "FERRY_CONCURRENCY"),
], ids=["broker-scheme", "broker-port", "env-engine", "cli-engine", "unknown-option", "concurrency"])
def test_producer_bad_settings(tmp_path: Path, redis_server: RedisServer, env: dict[str, str], args: list[str],
                               expected: str) -> None:
    listing = tmp_path / "ok.txt"
    listing.write_text("nginx\n")
    e = ferry_env(redis_server.url, tmp_path, **env)
    r = run_producer(["enqueue", str(listing), "--target", TARGET, *args], e)
    assert r.returncode == 2, r.stdout + r.stderr
    assert expected in one_error_line(r.stderr)
    assert "pw-Zq81" not in r.stdout + r.stderr
    assert_nothing_enqueued(redis_server)


@pytest.mark.parametrize(("env", "args", "expected"), [
    ({}, ["--concurrency", "-1"], "--concurrency must be a positive number, got -1"),
    ({"FERRY_CONCURRENCY": "-1"}, [], "FERRY_CONCURRENCY"),
    ({"FERRY_ENGINE": "foo"}, [], "FERRY_ENGINE"),
    ({}, ["--engine", "foo"], "FERRY_ENGINE"),
    ({"FERRY_BROKER_URL": "redis://:pw-Zq81@127.0.0.1:notaport/0"}, [], "FERRY_BROKER_URL"),
    ({}, ["flower", "--address", "0.0.0.0"], "needs --basic-auth"),
    ({}, ["flower", "--address", "flower.localhost"], "needs --basic-auth"),
    ({}, ["--loglevel", "chatty"], "--loglevel (FERRY_LOGLEVEL) must be one of"),
    ({"FERRY_LOGLEVEL": "chatty"}, [], "--loglevel (FERRY_LOGLEVEL) must be one of"),
    ({"FERRY_DOCKER_CONFIG": "/nonexistent/ferry/config.json"}, [], "FERRY_DOCKER_CONFIG: /nonexistent"),
    ({"FERRY_DOCKER_CONFIG": "/"}, [], "FERRY_DOCKER_CONFIG: the directory / holds no config.json"),
    ({"FERRY_METRICS_PORT": "0"}, [], "FERRY_METRICS_PORT"),
    ({}, ["--metrics-port", "70000"], "FERRY_METRICS_PORT"),
], ids=["cli-concurrency", "env-concurrency", "env-engine", "cli-engine", "broker-url", "open-flower",
        "open-flower-subdomain", "cli-loglevel", "env-loglevel", "docker-config-missing",
        "docker-config-dir-without-file", "env-metrics-port", "cli-metrics-port"])
def test_worker_bad_settings(tmp_path: Path, redis_server: RedisServer, env: dict[str, str], args: list[str],
                             expected: str) -> None:
    r = workers_cmd(args, ferry_env(redis_server.url, tmp_path, **env))
    assert r.returncode == 2, r.stdout + r.stderr
    assert expected in one_error_line(r.stderr)
    assert "pw-Zq81" not in r.stdout + r.stderr
    assert_nothing_enqueued(redis_server)


def test_standalone_reports_a_missing_docker_config_as_bad_input(tmp_path: Path) -> None:
    listing = tmp_path / "ok.txt"
    listing.write_text("nginx\n")
    env = ferry_env(None, tmp_path, FERRY_DOCKER_CONFIG=str(tmp_path / "nope"))
    r = run_producer(["enqueue", str(listing), "--target", TARGET, "--wait"], env, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"FERRY_DOCKER_CONFIG: {tmp_path / 'nope'} does not exist" in one_error_line(r.stderr)
    assert "standalone: started" not in r.stderr


def test_worker_whose_metrics_port_is_taken_says_so(tmp_path: Path, redis_server: RedisServer) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = workers_cmd([], ferry_env(redis_server.url, tmp_path, FERRY_METRICS_PORT=str(port),
                                      FERRY_METRICS_ADDRESS="127.0.0.1", FERRY_METRICS_DIR=str(tmp_path / "m")))
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port} (FERRY_METRICS_PORT)" in one_error_line(r.stderr)
    assert_nothing_enqueued(redis_server)


def test_worker_waits_for_an_unreachable_broker_and_says_so(tmp_path: Path) -> None:
    # Workers may start before Redis (systemd, compose): they keep retrying, naming the broker
    # with its password masked, instead of exiting.
    port = free_port()
    w = Worker("w", ferry_env(f"redis://:pw-Zq81@127.0.0.1:{port}/0", tmp_path), tmp_path / "w.log").start()
    try:
        wait_until(lambda: f"Cannot connect to redis://:**@127.0.0.1:{port}/0" in w.log(), 60,
                   "the connection error in the worker log")
        assert w.proc is not None and w.proc.poll() is None
    finally:
        w.stop()
    assert "pw-Zq81" not in w.log()


def test_registry_garbage_fails_the_image_and_the_worker_carries_on(
        make_cluster: Callable[..., Cluster], src: Registry, dst: Registry, src_pusher: Pusher,
        make_fault_proxy: Callable[[str], FaultProxy]) -> None:
    c = make_cluster(FERRY_RETRY__ATTEMPTS="2", FERRY_TASK_MAX_RETRIES="0")
    w = c.start_worker("w", concurrency=1)  # one process takes every image in turn
    good = push_image(src_pusher, "fine/ok", layers=1)
    real = push_image(src_pusher, "garbage/src", layers=1)
    body = src_pusher.client.get(f"{src.url}/v2/garbage/src/manifests/v1",
                                 headers={"Accept": OCI_MANIFEST}).content
    proxy = make_fault_proxy(src.host)

    def answer(repo: str, content: bytes, digest: str | None = None) -> None:
        headers = {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": digest or sha(content)}
        proxy.add_rule(Rule(status(200, headers, content), path_re=f"^/v2/{repo}/manifests/"))

    answer("garbage/json", b'{"schemaVersion": 2, "layers": [')
    answer("garbage/huge", b'{"schemaVersion": 2, "pad": "' + b"x" * (5 * 1024 * 1024) + b'"}')
    answer("garbage/digest", body.replace(b'"schemaVersion": 2', b'"schemaVersion":  2'), real.digest)
    repos = ["garbage/json", "garbage/huge", "garbage/digest", "fine/ok"]
    listing = c.listing([f"{proxy.host}/{r}:v1" for r in repos])
    r = c.producer("enqueue", str(listing), "--target", f"{dst.host}/mirror", "--wait",
                   "--json", str(c.tmp / "r.json"))
    assert r.returncode == 1, r.stdout + r.stderr
    doc = json.loads((c.tmp / "r.json").read_text())
    res = {i["source"].split("/", 1)[1].removesuffix(":v1"): i for i in doc["images"]}
    for repo in repos[:3]:
        assert res[repo]["status"] == "failed", res[repo]
        assert dst.manifest_digest(f"mirror/{repo}", "v1") is None
    print("\n" + "\n".join(f"{repo}: {res[repo]['error']}" for repo in repos[:3]))
    assert "json" in res["garbage/json"]["error"].lower()
    assert "the limit is 4194304" in res["garbage/huge"]["error"]
    assert f"hashes to {sha(body)}" not in res["garbage/digest"]["error"]  # it was altered
    # Read by tag, the body is checked against the digest the registry sent with it.
    assert f"but the registry says {real.digest}" in res["garbage/digest"]["error"]
    assert res["fine/ok"]["status"] == "synced"
    assert dst.manifest_digest("mirror/fine/ok", "v1") == good.digest
    assert w.proc is not None and w.proc.poll() is None
