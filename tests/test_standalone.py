"""Standalone runs (no FERRY_BROKER_URL): a private Redis and worker for one `enqueue --wait`.

The run must finish the cleanups of its batch before it stops its worker, say what they freed,
and leave no process behind however it is stopped.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.cluster import process_tree
from tests.support.dockerd import Dockerd
from tests.support.faultproxy import FaultProxy, Rule, stall
from tests.support.images import Pusher, push_image
from tests.support.procs import wait_until
from tests.support.registry import Registry
from tests.support.workers import ROOT, ferry_env, run_producer

pytestmark = pytest.mark.slow


def standalone(tmp_path: Path, lines: list[str], *args: str, **env: str) -> tuple[subprocess.CompletedProcess[str],
                                                                                 dict[str, object]]:
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join(lines) + "\n")
    report = tmp_path / "report.json"
    r = run_producer(["enqueue", str(listing), *args, "--wait", "--json", str(report)],
                     ferry_env(None, tmp_path, **env))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "standalone: started" in r.stderr
    return r, json.loads(report.read_text())


def cleanups_of(doc: dict[str, object]) -> tuple[set[str], set[str]]:
    """(syncs whose results name a chained cleanup, syncs whose cleanup has reported) in a JSON report."""
    images, cleanups = doc["images"], doc["cleanups"]
    assert isinstance(images, list) and isinstance(cleanups, list)
    named = {str(i["task_id"]) for i in images if i.get("cleanup_task_id")}
    recorded = {str(c["for_task"]) for c in cleanups}
    return named, recorded


def test_the_run_finishes_its_cleanups_and_reports_what_they_freed(
        tmp_path: Path, src: Registry, make_registry: Callable[..., Registry], src_pusher: Pusher) -> None:
    a, b = make_registry("a"), make_registry("b")
    for i in range(4):
        push_image(src_pusher, f"apps/c{i}", layers=2, layer_size=256 * 1024)
    # Two targets fill the node cache; keep_duration 0 lets each chained cleanup empty it again.
    r, doc = standalone(tmp_path, [f"{src.host}/apps/c{i}:v1" for i in range(4)],
                        "--target", f"{a.host}/m", "--target", f"{b.host}/m", FERRY_CACHE__KEEP_DURATION="0")
    named, recorded = cleanups_of(doc)
    assert len(named) == 4 and named <= recorded
    summary = doc["summary"]
    assert isinstance(summary, dict)
    assert summary["cleanups_done"] == summary["cleanups_expected"] == 4
    assert summary["freed_bytes"] >= 4 * 2 * 256 * 1024
    assert "freed by cleanup" in r.stdout and "so far" not in r.stdout
    cached = [p for p in (tmp_path / "cache").rglob("sha256/*") if p.is_file()]
    assert cached == []


def descendants(pid: int) -> list[int]:
    return [p for p in process_tree(pid) if p != pid]


def program(pid: int) -> str:
    """argv[0] as the process shows it now (redis-server puts its address there)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return ""


def has_private_redis(pid: int) -> bool:
    return any("redis-server" in program(p) for p in descendants(pid))


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_takes_the_private_redis_and_worker_down(
        sig: signal.Signals, tmp_path: Path, src: Registry, dst: Registry, src_pusher: Pusher,
        make_fault_proxy: Callable[[str], FaultProxy]) -> None:
    img = push_image(src_pusher, "slow/s", layers=1, layer_size=1024 * 1024)
    proxy = make_fault_proxy(src.host)
    proxy.add_rule(Rule(stall(120, after=64 * 1024), method="GET", path_re=f"/blobs/{img.blobs[1]}"))
    listing = tmp_path / "images.txt"
    listing.write_text(f"{proxy.host}/slow/s:v1\n")
    run = subprocess.Popen([sys.executable, "-m", "producer", "enqueue", str(listing), "--target",
                            f"{dst.host}/m", "--wait"], cwd=ROOT, env=ferry_env(None, tmp_path),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Mid-copy: the worker is reading the stalled layer.
        wait_until(lambda: any(s.end is None for s in proxy.select("GET", img.blobs[1])), 60, "the copy in flight")
        started = descendants(run.pid)
        names = {program(p) for p in started}
        assert has_private_redis(run.pid) and sys.executable in names, names
        run.send_signal(sig)
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 128 + sig, err
    assert f"stopped by {sig.name}" in err
    left = [p for p in started if not gone(p)]
    assert left == [], f"still running after {sig.name}: {left}"


@pytest.fixture
def daemon_images(dockerd: Dockerd) -> Iterator[Callable[[], set[str]]]:
    client = dockerd.client()

    def ids() -> set[str]:
        return {i.id for i in client.images.list(all=True)}

    yield ids
    client.close()


@pytest.mark.docker
def test_a_docker_engine_run_leaves_the_daemon_as_it_found_it(
        tmp_path: Path, src: Registry, dst: Registry, src_pusher: Pusher, dockerd: Dockerd,
        daemon_images: Callable[[], set[str]]) -> None:
    for i in range(4):
        push_image(src_pusher, f"apps/d{i}", layers=2, layer_size=64 * 1024, oci=False)
    before = daemon_images()
    r, doc = standalone(tmp_path, [f"{src.host}/apps/d{i}:v1" for i in range(4)], "--target", f"{dst.host}/m",
                        FERRY_ENGINE="docker", FERRY_DOCKER_HOST=dockerd.host)
    summary = doc["summary"]
    assert isinstance(summary, dict)
    assert summary["synced"] == 4
    named, recorded = cleanups_of(doc)
    assert len(named) == 4 and named <= recorded
    assert summary["freed_bytes"] > 0 and "freed by cleanup" in r.stdout
    assert daemon_images() <= before, "images pulled or tagged by the run are still in the daemon"


def test_ctrl_c_is_reported_too(tmp_path: Path) -> None:
    """SIGINT takes the same way out (exit 130), with no traceback."""
    listing = tmp_path / "images.txt"
    listing.write_text("127.0.0.1:1/nothing/here:v1\n")
    run = subprocess.Popen([sys.executable, "-m", "producer", "enqueue", str(listing), "--target", "127.0.0.1:1/m",
                            "--wait"], cwd=ROOT, env=ferry_env(None, tmp_path), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: has_private_redis(run.pid), 60, "the private Redis")
        started = descendants(run.pid)
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 130, err
    assert "Traceback" not in err
    assert [p for p in started if not gone(p)] == []
