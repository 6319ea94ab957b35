"""ferry across separate network hosts: network namespaces on a bridge, each with its own address and no
way out.

- ``src``: docker-registry behind a delay proxy (a registry far away), plain HTTP on a non-loopback
  address, so the workers reach it as an ``insecure`` registry and fall back from HTTPS to HTTP;
- ``dst``: docker-registry over HTTPS with a certificate from a private CA, trusted through ``ca_file``;
- ``redis``: redis-server with ``requirepass``;
- ``w1``, ``w2``, ``w3``: one ``python -m workers`` each, reaching everything by address.

The producer and the test's own reads run in the root namespace, which is on the bridge too. Needs root
and iproute2; under CI=true a machine without them fails this suite.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.standalone import redis_server_binary
from tests.support.cluster import wait_proc
from tests.support.images import Image, Pusher, push_image
from tests.support.netns import Host, NetnsUnavailable, Network
from tests.support.procs import wait_until
from tests.support.registry import Registry
from tests.support.tls import PrivateCA
from tests.support.workers import ROOT, ferry_env

pytestmark = pytest.mark.hosts

IMAGES = 40
WORKER_HOSTS = ("w1", "w2", "w3")
# Processes per worker host: the machine has 2 cores for 3 hosts, 2 registries, Redis and the producer.
CONCURRENCY = 2
# One-way delay in front of the source: 40 ms round trips, a registry in another region.
DELAY_MS = 20
REDIS_PASSWORD = "n3tns-br0ker-pw-81f"
SRC_PORT, SRC_PROXY_PORT, DST_PORT, REDIS_PORT = 5001, 5000, 5443, 6379
# A killed host's unacknowledged tasks come back after this (and kombu's sweep of it).
VISIBILITY_TIMEOUT = 15
# The scaling check: more worker hosts may not buy much on 2 cores, but must not cost more than this.
SLOWDOWN_BOUND = 1.5


@dataclass
class Hosts:
    net: Network
    tmp: Path
    ca: PrivateCA
    src: Registry
    dst: Registry
    images: list[Image] = field(default_factory=list)

    @property
    def redis_host(self) -> Host:
        return self.net.hosts["redis"]

    @property
    def broker_url(self) -> str:
        return f"redis://:{REDIS_PASSWORD}@{self.redis_host.address}:{REDIS_PORT}/0"

    @property
    def source(self) -> str:
        """The source as the workers see it: the delay proxy's address."""
        return f"{self.net.hosts['src'].address}:{SRC_PROXY_PORT}"

    def redis(self) -> redis.Redis[bytes]:
        """A new client; the caller closes it."""
        return redis.Redis.from_url(self.broker_url, socket_timeout=10)

    def redis_answers(self) -> bool:
        with self.redis() as r:
            return bool(r.ping())

    def env(self, **extra: str) -> dict[str, str]:
        registries = {self.source: {"insecure": True}, self.dst.host: {"ca_file": str(self.ca.ca_file)}}
        return ferry_env(self.broker_url, self.tmp, FERRY_REGISTRIES=json.dumps(registries),
                         FERRY_VISIBILITY_TIMEOUT=str(VISIBILITY_TIMEOUT), **extra)

    def start_workers(self, names: tuple[str, ...]) -> None:
        for name in names:
            host = self.net.hosts[name]
            env = self.env(FERRY_CACHE__DIR=str(self.tmp / "cache" / name))
            host.spawn([sys.executable, "-m", "workers", "--node", name, "--concurrency", str(CONCURRENCY)],
                       self.tmp / f"{name}.log", env=env, cwd=ROOT)
        with self.redis() as r:
            for name in names:
                wait_until(lambda n=name: bool(r.exists(f"_kombu.binding.ferry.node.{n}")), 60,
                           f"worker host {name} consuming")

    def fresh(self) -> None:
        """No workers, an empty broker, an empty destination, every link up."""
        for name in WORKER_HOSTS:
            host = self.net.hosts[name]
            host.kill_all()
            host.procs.clear()
            host.plug()
        with self.redis() as r:
            r.flushall()
        self.dst.stop()
        shutil.rmtree(self.dst.root / "data", ignore_errors=True)
        self.dst.start()

    def listing(self) -> Path:
        path = self.tmp / "images.txt"
        path.write_text("".join(f"{self.source}/{i.repo}:{i.tag}\n" for i in self.images))
        return path

    def enqueue(self, wait: bool = True) -> subprocess.Popen[str]:
        args = [sys.executable, "-m", "producer", "enqueue", str(self.listing()), "--target",
                f"{self.dst.host}/mirror", *(["--wait"] if wait else [])]
        return subprocess.Popen(args, cwd=ROOT, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def batch(self) -> str:
        with self.redis() as r:
            wait_until(lambda: bool(r.zcard("ferry:batches")), 30, "a batch in Redis")
            return str(r.zrevrange("ferry:batches", 0, 0)[0].decode())

    def part(self, batch: str, part: str) -> dict[str, dict[str, Any]]:
        with self.redis() as r:
            return {k.decode(): json.loads(v) for k, v in r.hgetall(f"ferry:batch:{batch}:{part}").items()}

    def assert_all_copied(self, batch: str) -> dict[str, dict[str, Any]]:
        results = self.part(batch, "results")
        assert len(results) == len(self.images)
        bad = {r["source"]: r.get("error") for r in results.values() if r["status"] != "synced"}
        assert bad == {}
        assert sorted(r["source"] for r in results.values()) == sorted(
            f"{self.source}/{i.repo}:{i.tag}" for i in self.images)
        with self.dst.client() as c:
            wrong = {i.repo: got for i in self.images
                     if (got := self.dst.manifest_digest(f"mirror/{i.repo}", i.tag, c)) != i.digest}
        assert wrong == {}, f"not digest-exact at the destination: {wrong}"
        return results


def finish(p: subprocess.Popen[str], timeout: float) -> tuple[int, str]:
    code, out, err = wait_proc(p, timeout)
    return code, out + err


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    tmp = tmp_path_factory.mktemp("hosts")
    net = Network()
    registries: list[Registry] = []
    try:
        net.start()
    except NetnsUnavailable as e:
        pytest.skip(f"network namespaces: {e}")
    try:
        src_host, dst_host, redis_host = (net.add_host(n) for n in ("src", "dst", "redis"))
        for name in WORKER_HOSTS:
            net.add_host(name)
        ca = PrivateCA(tmp / "ca")
        src = Registry(tmp / "src", port=SRC_PORT, address=src_host.address, prefix=src_host.prefix())
        registries.append(src.start())
        src_host.spawn([sys.executable, "-m", "tests.support.delayproxy",
                        "--listen", f"{src_host.address}:{SRC_PROXY_PORT}",
                        "--upstream", f"{src_host.address}:{SRC_PORT}", "--delay-ms", str(DELAY_MS)],
                       tmp / "delayproxy.log", cwd=ROOT)
        dst = Registry(tmp / "dst", port=DST_PORT, address=dst_host.address, prefix=dst_host.prefix(),
                       tls=ca.server(dst_host.address), ssl_context=ca.context())
        registries.append(dst.start())
        redis_host.spawn([redis_server_binary(), "--port", str(REDIS_PORT), "--bind", redis_host.address,
                          "--requirepass", REDIS_PASSWORD, "--save", "", "--appendonly", "no",
                          "--dir", str(tmp)], tmp / "redis.log")
        h = Hosts(net, tmp, ca, src, dst)
        wait_until(h.redis_answers, 15, "redis on its host")
        # The corpus goes straight into the source registry (not through the delay).
        with Pusher(src.url) as pusher:
            h.images = [push_image(pusher, f"corp/app{i:02d}", layers=2, layer_size=16 * 1024, base=1,
                                   salt="hosts") for i in range(IMAGES)]
        yield h
    finally:
        for reg in registries:
            reg.stop()
        net.teardown()


def test_hosts_have_their_own_addresses_and_no_way_out(hosts: Hosts) -> None:
    subnet = str(hosts.net.subnet)
    for host in hosts.net.hosts.values():
        assert hosts.net.routes(host) == [subnet], f"{host.name} has a route beyond its subnet"
    # A host cannot reach the machine's own loopback services: a worker's loopback is its own.
    w1 = hosts.net.hosts["w1"]
    probe = subprocess.run([*w1.prefix(), sys.executable, "-c",
                            f"import socket; socket.create_connection(('{hosts.redis_host.address}', "
                            f"{REDIS_PORT}), 5).close(); "
                            f"s = socket.socket(); s.settimeout(2); print(s.connect_ex(('127.0.0.1', {REDIS_PORT})))"],
                           capture_output=True, text=True, timeout=30)
    assert probe.returncode == 0 and probe.stdout.strip() != "0", probe.stderr


def test_a_batch_across_three_worker_hosts_is_digest_exact(hosts: Hosts) -> None:
    hosts.fresh()
    hosts.start_workers(WORKER_HOSTS)
    code, out = finish(hosts.enqueue(), 180)
    assert code == 0, out
    results = hosts.assert_all_copied(hosts.batch())
    nodes = {r["node"] for r in results.values()}
    assert len(nodes) >= 2, f"one host did all the work: {nodes}"
    # The source was spoken to over plain HTTP after an unverified HTTPS attempt failed; the destination
    # over verified HTTPS (it answers nothing else).
    assert hosts.dst.failed_handshakes() == []


def test_a_worker_host_taken_down_mid_batch_loses_nothing(hosts: Hosts) -> None:
    hosts.fresh()
    hosts.start_workers(WORKER_HOSTS)
    producer = hosts.enqueue()
    batch = hosts.batch()

    def w3_copying() -> bool:
        return any(s.get("node") == "w3" and s.get("phase") == "running" for s in hosts.part(batch, "state").values())

    wait_until(w3_copying, 60, "an image being copied on w3")
    w3 = hosts.net.hosts["w3"]
    in_flight = [t for t, s in hosts.part(batch, "state").items() if s.get("node") == "w3"]
    w3.kill_all()
    w3.unplug()
    done_at_kill = len(hosts.part(batch, "results"))
    assert done_at_kill < IMAGES, "the batch ended before the host went down"
    code, out = finish(producer, 180)
    assert code == 0, out
    results = hosts.assert_all_copied(batch)
    # What w3 was copying when it died was copied again by the hosts that stayed up.
    assert in_flight and all(results[t]["node"] in ("w1", "w2") for t in in_flight), (in_flight, results)


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cpu_seconds(host: Host) -> float:
    """CPU time used so far by the processes of one host (and their children that ended)."""
    ticks = 0
    for pid in host.pids():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        ticks += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Run:
    rate: float  # images per second, first sync's start to last sync's end
    busy: float  # share of the machine's CPU time in use meanwhile (every process, not only ferry's)
    cores: dict[str, float]  # CPU seconds per wall second, by role: workers, registries, redis


def measure(hosts: Hosts, n: int) -> Run:
    hosts.fresh()
    hosts.start_workers(WORKER_HOSTS[:n])
    roles = {"workers": WORKER_HOSTS[:n], "registries": ("src", "dst"), "redis": ("redis",)}

    def used() -> dict[str, float]:
        return {role: sum(cpu_seconds(hosts.net.hosts[h]) for h in names) for role, names in roles.items()}

    before, machine_before = used(), cpu_jiffies()
    code, out = finish(hosts.enqueue(), 180)
    after, machine_after = used(), cpu_jiffies()
    assert code == 0, out
    results = hosts.assert_all_copied(hosts.batch()).values()
    start = min(r["first_started_at"] or r["started_at"] for r in results)
    end = max(r["started_at"] + r["duration_s"] for r in results)
    busy = (machine_after[0] - machine_before[0]) / max(1, machine_after[1] - machine_before[1])
    # Over the batch's span: the producer's own start and wait are not the cluster's work.
    return Run(len(results) / (end - start), busy, {k: (after[k] - before[k]) / (end - start) for k in roles})


@pytest.mark.measure
def test_throughput_with_one_two_and_three_worker_hosts(hosts: Hosts) -> None:
    runs = {n: measure(hosts, n) for n in (1, 2, 3)}
    print(f"\nscaling across worker hosts ({IMAGES} images of 2 x 16 KiB layers, {CONCURRENCY} processes per host, "
          f"source {2 * DELAY_MS} ms away, destination over TLS, {len(os.sched_getaffinity(0))} cores):")
    for n, run in runs.items():
        shares = ", ".join(f"{role} {c:.2f}" for role, c in run.cores.items())
        print(f"  {n} worker host(s), {n * CONCURRENCY} processes: {run.rate:5.1f} images/s "
              f"({run.rate / runs[1].rate:.2f}x one host); cores used: {shares}; machine {run.busy:.0%} busy")
    for n in (2, 3):
        assert runs[n].rate * SLOWDOWN_BOUND >= runs[1].rate, \
            f"{n} hosts ran {runs[1].rate / runs[n].rate:.2f}x slower than 1"
