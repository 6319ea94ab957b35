"""``python -m workers health``: the probe the image's HEALTHCHECK and the Kubernetes manifests run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.procs import free_port
from tests.support.redis import RedisServer
from tests.support.workers import ROOT, Worker, ferry_env


def health(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "workers", "health", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_health_follows_the_broker_and_the_nodes_worker(tmp_path: Path) -> None:
    broker = RedisServer(tmp_path / "redis", password="s3cret-pass").start()
    worker: Worker | None = None
    try:
        env = ferry_env(broker.url, tmp_path, FERRY_NODE="probed")
        ok = health(env)
        assert (ok.returncode, ok.stdout.strip()) == (0, "ok"), ok.stderr

        absent = health(env, "--worker")
        assert absent.returncode == 1 and "no worker of node 'probed' reported in within 30 s" in absent.stderr

        with broker.client() as c:
            worker = Worker("probed", env, tmp_path / "worker.log", concurrency=1).start(c)
        present = health(env, "--worker")
        assert present.returncode == 0, present.stderr

        wrong = health(ferry_env(broker.url.replace("s3cret-pass", "not-it"), tmp_path))
        assert wrong.returncode == 1 and "broker unreachable" in wrong.stderr
        assert "not-it" not in wrong.stderr + wrong.stdout
        down = health(ferry_env(f"redis://:s3cret-pass@127.0.0.1:{free_port()}/0", tmp_path))
        assert down.returncode == 1 and "broker unreachable" in down.stderr
        assert "s3cret-pass" not in down.stderr + down.stdout

        unset = health(ferry_env(None, tmp_path))
        assert unset.returncode == 2 and "FERRY_BROKER_URL is not set" in unset.stderr
    finally:
        if worker is not None:
            worker.stop()
        broker.stop()
