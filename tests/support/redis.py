"""Real redis-server processes on free loopback ports, with kill/restart for durability tests."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from producer.standalone import bundled_redis_binary as bundled_redis_binary  # re-exported for tests
from producer.standalone import redis_server_binary
from tests.support.procs import free_port, stop, wait_until


@dataclass
class RedisServer:
    root: Path
    port: int = 0
    appendonly: bool = False
    binary: str | None = None
    password: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis[bytes]:
        """A new client; the caller closes it."""
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def ping(self) -> bool:
        with self.client() as c:
            return bool(c.ping())

    def start(self) -> RedisServer:
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        args = [
            self.binary or redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.root),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--logfile", str(self.root / "redis.log"),
            "--daemonize", "no",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        if self.appendonly:
            args += ["--appendfsync", "always"]  # every acknowledged write survives SIGKILL
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_until(self.ping, 15, f"redis on {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL: no shutdown save, no goodbye to clients."""
        if self.proc is not None:
            stop(self.proc, signal.SIGKILL)
            self.proc = None

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    def log(self) -> str:
        path = self.root / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-session")).start()
    yield server
    server.stop()
