"""A small ferry cluster for fault tests: real Redis, real worker processes, producer runs, /proc readings."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import wait_until
from tests.support.redis import RedisServer
from tests.support.workers import ROOT, Worker, ferry_env, run_producer


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from every thread's children list)."""
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return out


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children(p)
    return tree


def rss_bytes(pid: int) -> int:
    """VmRSS of one process, 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(pid: int) -> int:
    return sum(rss_bytes(p) for p in process_tree(pid))


@dataclass
class Cluster:
    redis: RedisServer
    tmp: Path
    env: dict[str, str]
    workers: list[Worker] = field(default_factory=list)
    background: list[subprocess.Popen[str]] = field(default_factory=list)

    def start_worker(self, node: str, concurrency: int = 2, loglevel: str | None = None, **extra: str) -> Worker:
        env = {**self.env, **extra}
        if loglevel:
            env["FERRY_LOGLEVEL"] = loglevel
        w = Worker(node, env, self.tmp / f"{node}.log", concurrency=concurrency)
        with self.redis.client() as c:
            w.start(c)
        self.workers.append(w)
        return w

    def stop(self) -> None:
        for p in self.background:
            if p.poll() is None:
                p.kill()
            p.communicate()
        for w in self.workers:
            w.stop()

    def producer(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return run_producer(list(args), self.env, timeout=timeout)

    def producer_bg(self, *args: str) -> subprocess.Popen[str]:
        """A producer run in the background (e.g. ``enqueue --wait`` while faults happen)."""
        p = subprocess.Popen([sys.executable, "-m", "producer", *args], cwd=ROOT, env=self.env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.background.append(p)
        return p

    def listing(self, lines: list[str], name: str = "images.txt") -> Path:
        path = self.tmp / name
        path.write_text("\n".join(lines) + "\n")
        return path

    def latest_batch(self, timeout: float = 30) -> str:
        found: list[str] = []

        def has() -> bool:
            with self.redis.client() as c:
                found[:] = [b.decode() for b in c.zrevrange("ferry:batches", 0, 0)]
            return bool(found)

        wait_until(has, timeout, "a batch in Redis")
        return found[0]

    def hash(self, batch: str, part: str) -> dict[str, str]:
        with self.redis.client() as c:
            return {k.decode(): v.decode() for k, v in c.hgetall(f"ferry:batch:{batch}:{part}").items()}

    def results(self, batch: str) -> dict[str, dict[str, Any]]:
        return {k: json.loads(v) for k, v in self.hash(batch, "results").items()}

    def worker(self, node: str) -> Worker:
        return next(w for w in self.workers if w.node == node)

    def logs(self) -> str:
        return "\n".join(w.log() for w in self.workers)


@pytest.fixture(name="make_cluster")
def make_cluster_fixture(tmp_path: Path) -> Iterator[Any]:
    """``make_cluster(appendonly=False, password=None, **env)``: a Redis and an env for workers."""
    made: list[Cluster] = []

    def make(appendonly: bool = False, password: str | None = None, **extra: str) -> Cluster:
        n = len(made)
        server = RedisServer(tmp_path / f"redis{n}", appendonly=appendonly, password=password).start()
        c = Cluster(server, tmp_path, ferry_env(server.url, tmp_path, **extra))
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()
        c.redis.stop()


def wait_proc(p: subprocess.Popen[str], timeout: float, context: str = "") -> tuple[int, str, str]:
    """The producer's exit code and output; past ``timeout`` it is killed and the test fails with its
    output and ``context`` (e.g. the workers' logs)."""
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"producer still running after {timeout}s:\n{out}\n{err}\n{context}") from None
    return p.returncode, out, err

