"""deploy/: the image built from deploy/Dockerfile runs a worker, and deploy/docker-compose.yml comes up,
for real, on a private dockerd (vfs, no bridge: every container uses the host's network).

The image is built once per session (see tests/support/deploy_image.py) and used by both tests.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.support.cluster import wait_proc
from tests.support.deploy_image import BuiltImages, Phases, docker_cli
from tests.support.dockerd import Dockerd
from tests.support.faultproxy import FaultProxy, Rule, delay
from tests.support.images import Image, Pusher, push_image
from tests.support.procs import free_port, wait_until
from tests.support.redis import RedisServer
from tests.support.registry import Registry
from tests.support.workers import ROOT, ferry_env

# The first test to run also builds the image (and, on a fresh machine, debootstraps its base).
pytestmark = [pytest.mark.deploy, pytest.mark.timeout(900)]

FERRY_UID = 10001


def corpus(pusher: Pusher, n: int, prefix: str) -> list[Image]:
    imgs = [push_image(pusher, f"{prefix}/app{i}", layers=2, layer_size=16 * 1024, base=1) for i in range(n - 1)]
    imgs.append(push_image(pusher, f"{prefix}/multi", archs=("amd64", "arm64")))
    return imgs


def enqueue(env: dict[str, str], tmp: Path, lines: list[str], target: str, *, wait: bool = True,
            ) -> subprocess.Popen[str]:
    listing = tmp / f"images-{time.monotonic_ns()}.txt"
    listing.write_text("\n".join(lines) + "\n")
    args = [sys.executable, "-m", "producer", "enqueue", str(listing), "--target", target]
    if wait:
        args += ["--wait", "--timeout", "240", "--json", str(listing.with_suffix(".json"))]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen[str], timeout: float, logs: str = "") -> str:
    code, out, err = wait_proc(p, timeout, logs[-6000:])
    assert code == 0, f"{out}\n{err}\n{logs[-6000:]}"
    return out


def assert_mirrored(dst: Registry, imgs: list[Image]) -> None:
    for img in imgs:
        assert dst.manifest_digest(f"mirror/{img.repo}", img.tag) == img.digest, img.repo


def latest_batch(client: redis.Redis[bytes]) -> str:
    found = client.zrevrange("ferry:batches", 0, 0)
    assert found, "no batch in Redis"
    return found[0].decode()


def inspect(daemon: Dockerd, name: str) -> dict[str, Any]:
    doc: list[dict[str, Any]] = json.loads(docker_cli(daemon, "inspect", name).stdout)
    return doc[0]


def process_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


# ---- the image ---------------------------------------------------------------------------------

def test_image_runs_a_worker_that_mirrors_digest_exact(
        ferry_images: BuiltImages, deploy_dockerd: Dockerd, src: Registry, dst: Registry, src_pusher: Pusher,
        tmp_path: Path) -> None:
    dockerd = deploy_dockerd
    password = secrets.token_hex(12)
    broker = RedisServer(tmp_path / "redis", password=password).start()
    name = f"ferry-worker-{os.getpid()}"
    try:
        image = inspect(dockerd, ferry_images.ferry)
        cfg = image["Config"]
        assert cfg["Entrypoint"] == ["python", "-m"] and cfg["Cmd"] == ["workers"]
        assert cfg["User"] == f"{FERRY_UID}:{FERRY_UID}"
        assert cfg["Healthcheck"]["Test"] == ["CMD", "python", "-m", "workers", "health"]
        # The final stage is the base plus one layer (the venv, the user, its home).
        assert len(image["RootFS"]["Layers"]) == 2, image["RootFS"]["Layers"]

        # Docker runs the image's own HEALTHCHECK; only its timing is shortened here. Read-only root and
        # writable /tmp and cache, as the Kubernetes manifests run it.
        docker_cli(dockerd, "run", "-d", "--name", name, "--network", "host", "--read-only",
                   "--tmpfs", "/tmp", "--tmpfs", f"/var/lib/ferry/cache:uid={FERRY_UID}",
                   "--health-interval", "2s", "--health-start-period", "0s", "--health-retries", "1",
                   "-e", f"FERRY_BROKER_URL={broker.url}", "-e", "FERRY_NODE=imaged",
                   "-e", "FERRY_RETRY__BASE_DELAY=0.1",
                   ferry_images.ferry, "workers", "--concurrency", "2")
        with broker.client() as c:
            wait_until(lambda: bool(c.exists("_kombu.binding.ferry.node.imaged")), 90,
                       "the containerised worker consuming")
        state = inspect(dockerd, name)["State"]
        assert process_uid(state["Pid"]) == FERRY_UID  # as the host's kernel sees it
        assert docker_cli(dockerd, "exec", name, "id", "-u").stdout.strip() == str(FERRY_UID)

        imgs = corpus(src_pusher, 6, "img")
        env = ferry_env(broker.url, tmp_path)
        out = finish(enqueue(env, tmp_path, [f"{src.host}/{i.repo}:{i.tag}" for i in imgs], f"{dst.host}/mirror"),
                     180, docker_cli(dockerd, "logs", name).stderr)
        report = json.loads(next(tmp_path.glob("images-*.json")).read_text())
        assert report["summary"]["synced"] == len(imgs), out
        assert_mirrored(dst, imgs)

        wait_until(lambda: inspect(dockerd, name)["State"]["Health"]["Status"] == "healthy", 60,
                   "docker's HEALTHCHECK to pass")
        ok = docker_cli(dockerd, "exec", name, "python", "-m", "workers", "health", "--worker")
        assert ok.stdout.strip() == "ok"
        bad = docker_cli(dockerd, "exec", "-e",
                         f"FERRY_BROKER_URL=redis://:wrong-{password[:4]}@127.0.0.1:{broker.port}/0", name,
                         "python", "-m", "workers", "health", check=False)
        assert bad.returncode == 1 and "broker unreachable" in bad.stderr, bad.stderr
        assert f"wrong-{password[:4]}" not in bad.stderr
        gone = docker_cli(dockerd, "exec", "-e", "FERRY_NODE=elsewhere", name,
                          "python", "-m", "workers", "health", "--worker", check=False)
        assert gone.returncode == 1 and "no worker of node 'elsewhere'" in gone.stderr

        # No build tools left in: no pip, no compiler.
        assert docker_cli(dockerd, "exec", name, "python", "-m", "pip", "--version", check=False).returncode != 0
        assert docker_cli(dockerd, "exec", name, "sh", "-c", "command -v gcc || command -v cc || command -v make",
                          check=False).returncode != 0

        # SIGTERM is Celery's warm shutdown: the worker leaves cleanly (exit 0).
        with ferry_images.phases.phase("image: docker stop (warm shutdown)"):
            docker_cli(dockerd, "stop", "-t", "60", name)
        assert inspect(dockerd, name)["State"]["ExitCode"] == 0
        logs = docker_cli(dockerd, "logs", name)
        assert "Warm shutdown" in logs.stdout + logs.stderr, (logs.stdout + logs.stderr)[-3000:]
    finally:
        docker_cli(dockerd, "rm", "-f", name, check=False)
        broker.stop()


# ---- compose -----------------------------------------------------------------------------------

@dataclass
class Compose:
    daemon: Dockerd
    project: str
    env_file: Path
    env: dict[str, str]
    redis_url: str
    flower_port: int
    flower_auth: tuple[str, str]

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["docker-compose", "-p", self.project, "-f", str(ROOT / "deploy" / "docker-compose.yml"),
                            "--env-file", str(self.env_file), *args],
                           env=self.env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"docker-compose {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
        return r

    def logs(self) -> str:
        r = subprocess.run(["docker-compose", "-p", self.project, "-f", str(ROOT / "deploy" / "docker-compose.yml"),
                            "--env-file", str(self.env_file), "logs", "--no-color", "--tail", "80"],
                           env=self.env, capture_output=True, text=True, timeout=120)
        return r.stdout + r.stderr

    def client(self) -> redis.Redis[bytes]:
        return redis.Redis.from_url(self.redis_url, socket_timeout=5)

    def redis_ready(self) -> bool:
        try:
            with self.client() as c:
                return bool(c.ping())
        except redis.RedisError:
            return False

    def workers_ready(self) -> bool:
        try:
            with self.client() as c:
                return all(c.exists(f"_kombu.binding.ferry.node.{self.project}-{n}") for n in (1, 2))
        except redis.RedisError:
            return False


@pytest.fixture
def compose(ferry_images: BuiltImages, deploy_dockerd: Dockerd, tmp_path: Path) -> Iterator[Compose]:
    dockerd = deploy_dockerd
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose); CI installs it")
    project = f"ferryt{os.getpid()}{secrets.token_hex(2)}"
    password = secrets.token_hex(16)
    redis_port, flower_port = free_port(), free_port()
    flower_auth = ("admin", secrets.token_hex(8))
    env_file = tmp_path / "ferry.env"
    # The same keys as deploy/ferry.env.example, with free ports and fresh passwords.
    env_file.write_text("\n".join([
        f"REDIS_PASSWORD={password}", f"REDIS_PORT={redis_port}", "REDIS_BIND=127.0.0.1",
        f"FLOWER_PORT={flower_port}", "FLOWER_ADDRESS=127.0.0.1",
        f"FERRY_FLOWER_BASIC_AUTH={flower_auth[0]}:{flower_auth[1]}",
        f"FERRY_IMAGE={ferry_images.ferry}", f"FERRY_REDIS_IMAGE={ferry_images.redis}",
        f"FERRY_NODE_PREFIX={project}", f"FERRY_ENV_FILE={env_file}",
        "FERRY_CONCURRENCY=2", "FERRY_RETRY__BASE_DELAY=0.1", "FERRY_RETRY__MAX_DELAY=1",
    ]) + "\n")
    assert set(keys(env_file)) >= set(keys(ROOT / "deploy" / "ferry.env.example"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FERRY_", "REDIS_", "FLOWER_"))}
    env["DOCKER_HOST"] = dockerd.host
    c = Compose(dockerd, project, env_file, env, f"redis://:{password}@127.0.0.1:{redis_port}/0", flower_port,
                flower_auth)
    yield c
    subprocess.run(["docker-compose", "-p", project, "-f", str(ROOT / "deploy" / "docker-compose.yml"),
                    "--env-file", str(env_file), "down", "-v", "--remove-orphans", "-t", "10"],
                   env=env, capture_output=True, timeout=300)


def keys(env_file: Path) -> list[str]:
    return [line.split("=", 1)[0] for line in env_file.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def test_compose_cluster_survives_a_redis_restart_and_a_down_up(
        compose: Compose, ferry_images: BuiltImages, src: Registry, dst: Registry, src_pusher: Pusher,
        make_fault_proxy: Any, tmp_path: Path) -> None:
    phases: Phases = ferry_images.phases
    with phases.phase("compose: up"):
        compose("up", "-d")
        wait_until(compose.redis_ready, 60, f"compose Redis\n{compose.logs()}")
        wait_until(compose.workers_ready, 90, f"both compose workers\n{compose.logs()}")
    with compose.client() as c:
        assert c.config_get("appendonly")["appendonly"] == "yes"
        assert c.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    # Without the password Redis answers nothing.
    with pytest.raises(redis.AuthenticationError), \
            redis.Redis(port=int(compose.redis_url.rsplit(":", 1)[1].split("/")[0])) as anon:
        anon.ping()

    # Flower: basic auth.
    flower = f"http://127.0.0.1:{compose.flower_port}/"
    wait_until(lambda: _http_status(flower) == 401, 60, f"Flower asking for credentials\n{compose.logs()}")
    assert httpx.get(flower, auth=compose.flower_auth, timeout=10).status_code == 200

    # A batch from the host, slowed at the source so Redis restarts while it runs.
    imgs = corpus(src_pusher, 12, "cmp")
    proxy: FaultProxy = make_fault_proxy(src.host)
    proxy.add_rule(Rule(delay(1.2), method="GET", path_re=r"/cmp/[^/]+/manifests/"))
    env = ferry_env(compose.redis_url, tmp_path)
    run = enqueue(env, tmp_path, [f"{proxy.host}/{i.repo}:{i.tag}" for i in imgs], f"{dst.host}/mirror")
    with compose.client() as c:
        wait_until(lambda: c.exists("ferry:batches") and c.hlen(f"ferry:batch:{latest_batch(c)}:results") >= 2,
                   90, f"two images done\n{compose.logs()}")
        batch = latest_batch(c)
        done_before = c.hlen(f"ferry:batch:{batch}:results")
    assert done_before < len(imgs), "the batch finished before Redis could be restarted"
    with phases.phase("compose: restart redis"):
        compose("restart", "redis")
    with phases.phase("compose: rest of the batch"):
        finish(run, 180, compose.logs())
    assert_mirrored(dst, imgs)
    with compose.client() as c:
        results = {k.decode(): json.loads(v) for k, v in c.hgetall(f"ferry:batch:{batch}:results").items()}
    assert len(results) == len(imgs) and {r["status"] for r in results.values()} == {"synced"}
    # Both workers took part.
    assert {r["node"] for r in results.values()} == {f"{compose.project}-1", f"{compose.project}-2"}

    # down (keeping volumes) and up: the batch records come back from the AOF volume.
    with phases.phase("compose: down + up"):
        compose("down", "-t", "30")
        assert not compose.redis_ready()
        compose("up", "-d")
        wait_until(compose.redis_ready, 60, f"compose Redis after up\n{compose.logs()}")
        wait_until(compose.workers_ready, 90, f"compose workers after up\n{compose.logs()}")
    with compose.client() as c:
        assert c.hlen(f"ferry:batch:{batch}:results") == len(imgs)
    status = subprocess.run([sys.executable, "-m", "producer", "report", batch, "--json", "-"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["summary"]["synced"] == len(imgs)
    # And the cluster works again: one more image.
    more = push_image(src_pusher, "cmp/after", layers=1, layer_size=8 * 1024)
    finish(enqueue(env, tmp_path, [f"{src.host}/{more.repo}:{more.tag}"], f"{dst.host}/mirror"), 120,
           compose.logs())
    assert_mirrored(dst, [more])


def _http_status(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0
