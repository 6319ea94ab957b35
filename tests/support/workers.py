"""Real ``python -m workers`` processes and ``python -m producer`` runs for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.support.procs import stop, wait_until

ROOT = Path(__file__).resolve().parents[2]


def ferry_env(broker_url: str | None, tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    env.update(PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1", FERRY_CACHE__DIR=str(tmp / "cache"),
               FERRY_RETRY__BASE_DELAY="0.1", FERRY_RETRY__MAX_DELAY="1")
    if broker_url:
        env["FERRY_BROKER_URL"] = broker_url
    env.update(extra)
    return env


class _Process:
    """Kill, stop and log for a ``python -m workers …`` process started in its own session."""

    proc: subprocess.Popen[bytes] | None
    log_path: Path

    def _spawn(self, args: list[str], env: dict[str, str]) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "workers", *args], cwd=ROOT, env=env,
                                         stdout=log, stderr=log, start_new_session=True)

    def kill(self) -> None:
        if self.proc is not None:
            stop(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, signal.SIGTERM, timeout=20)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Worker(_Process):
    node: str
    env: dict[str, str]
    log_path: Path
    concurrency: int = 2
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, broker: redis.Redis | None = None) -> Worker:
        self._spawn(["--node", self.node, "--concurrency", str(self.concurrency)], self.env)
        if broker is not None:
            wait_until(lambda: self.ready(broker), 30, f"worker {self.node}")
        return self

    def ready(self, broker: redis.Redis) -> bool:
        # A consuming worker registers its queues in kombu's binding table.
        return bool(broker.exists(f"_kombu.binding.ferry.node.{self.node}"))


def run_producer(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "producer", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@dataclass
class Beat(_Process):
    """A ``python -m workers beat`` process."""

    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> Beat:
        self._spawn(["beat"], self.env)
        return self
