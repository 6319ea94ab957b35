"""A private, real Docker daemon for tests (its own socket, data root, exec root and containerd)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker
import pytest

from tests.support.procs import stop, wait_until


@dataclass
class Dockerd:
    """``root`` holds image data and logs; sockets live in a short /tmp dir (unix paths max ~108)."""

    root: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    run_dir: Path | None = None

    @property
    def socket(self) -> Path:
        assert self.run_dir is not None, "not started"
        return self.run_dir / "d.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def client(self) -> docker.DockerClient:
        """A new SDK client; the caller closes it."""
        return docker.DockerClient(base_url=self.host, version="auto", timeout=120)

    def ping(self) -> bool:
        with contextlib.closing(self.client()) as c:
            return bool(c.ping())

    def start(self) -> Dockerd:
        if not shutil.which("dockerd"):
            raise RuntimeError("dockerd is not installed (apt-get install docker.io)")
        self.root.mkdir(parents=True, exist_ok=True)
        self.run_dir = Path(tempfile.mkdtemp(prefix="fd", dir="/tmp"))
        args = [
            "dockerd",
            "--host", self.host,
            "--data-root", str(self.root / "data"),
            # The managed containerd puts its sockets under the exec root: keep it short too.
            "--exec-root", str(self.run_dir / "x"),
            "--pidfile", str(self.run_dir / "d.pid"),
            # No kernel overlay, netfilter or bridge needed: only pulls and pushes happen here.
            "--storage-driver=vfs",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-masq=false",
            "--ip-forward=false",
            "--bridge=none",
        ]
        with open(self.root / "dockerd.log", "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)
        proc = self.proc
        try:
            wait_until(lambda: proc.poll() is not None or (self.socket.exists() and self.ping()), 60,
                       f"dockerd on {self.socket}")
            if proc.poll() is not None:
                raise RuntimeError(f"dockerd exited ({proc.returncode}); see {self.root / 'dockerd.log'}")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, timeout=30)  # dockerd stops its containerd on SIGTERM
            self.proc = None
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def log(self) -> str:
        path = self.root / "dockerd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def buildkit_build(self, context: Path, tag: str) -> None:
        """``DOCKER_BUILDKIT=1 docker build`` on this daemon: leaves BuildKit cache records behind.

        Tries each docker CLI on PATH: a newer CLI without the buildx plugin refuses BuildKit,
        Debian's docker.io CLI has it built in."""
        env = dict(os.environ, DOCKER_BUILDKIT="1", DOCKER_HOST=self.host)
        tried: list[str] = []
        for cli in docker_clis():
            r = subprocess.run([cli, "build", "-q", "-t", tag, str(context)], env=env, capture_output=True,
                               text=True, timeout=300)
            if r.returncode == 0:
                return
            tried.append(f"{cli}: {r.stderr.strip()[-300:]}")
        raise RuntimeError("no docker CLI could build with BuildKit:\n" + "\n".join(tried))


def docker_clis() -> list[str]:
    """Every ``docker`` executable on PATH, in PATH order, each file once."""
    found: list[str] = []
    for d in os.environ.get("PATH", "").split(os.pathsep):
        cli = Path(d) / "docker"
        if cli.is_file() and os.access(cli, os.X_OK) and not any(cli.samefile(f) for f in found):
            found.append(str(cli))
    return found


def session_dockerd(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Dockerd]:
    """A daemon for a test session, in a directory of its own; the body of a session fixture."""
    if not shutil.which("dockerd"):
        pytest.skip("dockerd is not installed (apt-get install docker.io); CI installs it")
    if os.geteuid() != 0:
        pytest.skip("dockerd needs root")
    daemon = Dockerd(tmp_path_factory.mktemp(name)).start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    yield from session_dockerd(tmp_path_factory, "dockerd")
