"""The ferry image, built for real on a private dockerd from ``deploy/Dockerfile``.

No public image registry is reachable from the tests, so the base is made here: ``debootstrap
--variant=minbase`` with Debian's python3 and its venv module, trimmed, tarred and ``docker import``-ed.
The tarball is cached under ``/var/cache/ferry-test`` (``FERRY_TEST_CACHE``), named by a hash of
everything that goes into it, so a warm machine skips debootstrap and a changed recipe makes a new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.dockerd import Dockerd, docker_clis, session_dockerd
from tests.support.workers import ROOT

CACHE_DIR = Path(os.environ.get("FERRY_TEST_CACHE", "/var/cache/ferry-test"))
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# python3 runs ferry; python3-venv (ensurepip) lets the builder stage make the virtualenv.
PACKAGES = ("python3", "python3-venv")
REDIS_PACKAGES = ("redis-server",)
# Emptied after debootstrap: package caches and lists, docs, man pages, translations (~145 MB of 275).
TRIM = ("var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/info",
        "usr/share/locale")
# Bump when the way the base is made changes in a way the fields above do not show.
RECIPE = 1
IMAGE = "ferry-test:deploy"


@dataclass
class Phases:
    """Wall time of each phase of getting the image, in order (printed by the suite)."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = round(time.monotonic() - start, 1)

    def line(self) -> str:
        return ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())


def local_cas() -> list[Path]:
    """The machine's own CAs (a TLS-inspecting proxy's, say): the base trusts them, so pip inside the
    build reaches PyPI wherever the machine itself does."""
    return sorted(Path("/usr/local/share/ca-certificates").glob("**/*.crt"))


def base_key() -> str:
    recipe = json.dumps([RECIPE, SUITE, "minbase", MIRROR, PACKAGES, REDIS_PACKAGES, TRIM,
                         [hashlib.sha256(ca.read_bytes()).hexdigest() for ca in local_cas()]])
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


@dataclass
class Tarballs:
    base: Path
    redis: Path


def _trim(root: Path) -> None:
    for rel in TRIM:
        for entry in (root / rel).glob("*"):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _run(args: list[str], what: str, timeout: float = 900, **kw: object) -> None:
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed ({r.returncode}):\n{r.stdout[-3000:]}{r.stderr[-2000:]}")


def _tar(root: Path, dest: Path) -> None:
    part = dest.with_suffix(".part")
    _run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(part), "."], f"tar of {root}", timeout=300)
    os.replace(part, dest)


def rootfs_tarballs(phases: Phases) -> Tarballs:
    """The cached base and Redis rootfs tarballs, made first when missing (under a lock: parallel
    sessions share them). The Redis one is the base plus Debian's redis-server, for the compose test
    (whose file names an official redis image that cannot be pulled here)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    key = base_key()
    out = Tarballs(CACHE_DIR / f"base-{SUITE}-python3-{key}.tar", CACHE_DIR / f"redis-{SUITE}-{key}.tar")
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.base.exists() and out.redis.exists():
            phases.seconds.setdefault("debootstrap (cached)", 0.0)
            return out
        if not shutil.which("debootstrap"):
            raise RuntimeError("debootstrap is not installed (apt-get install debootstrap)")
        debs = CACHE_DIR / "debs"
        debs.mkdir(exist_ok=True)
        with phases.phase("debootstrap"), tempfile.TemporaryDirectory(dir=CACHE_DIR, prefix="build-") as tmp:
            root, redis_root = Path(tmp) / "root", Path(tmp) / "redis"
            _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", f"--cache-dir={debs}",
                  SUITE, str(root), MIRROR], "debootstrap")
            for ca in local_cas():
                shutil.copy(ca, root / "usr/local/share/ca-certificates" / ca.name)
            if local_cas():
                _run(["chroot", str(root), "update-ca-certificates"], "update-ca-certificates")
            _run(["cp", "-a", str(root), str(redis_root)], "copy of the base")
            # Install without starting the service; debootstrap left the package lists in place.
            rc_d = redis_root / "usr/sbin/policy-rc.d"
            rc_d.write_text("#!/bin/sh\nexit 101\n")
            rc_d.chmod(0o755)
            shutil.copy("/etc/resolv.conf", redis_root / "etc/resolv.conf")
            _run(["chroot", str(redis_root), "apt-get", "install", "-y", "-q", "--no-install-recommends",
                  *REDIS_PACKAGES], "apt-get install redis-server",
                 env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive"})
            rc_d.unlink()
            (redis_root / "etc/resolv.conf").unlink()
            (redis_root / "data").mkdir()
            _run(["chroot", str(redis_root), "chown", "redis:redis", "/data"], "chown /data")
            for r in (root, redis_root):
                _trim(r)
            _tar(root, out.base)
            _tar(redis_root, out.redis)
        for old in [*CACHE_DIR.glob("base-*.tar"), *CACHE_DIR.glob("redis-*.tar")]:
            if old not in (out.base, out.redis):
                old.unlink()
    return out


def docker_cli(daemon: Dockerd, *args: str, timeout: float = 600, check: bool = True,
               ) -> subprocess.CompletedProcess[str]:
    """The docker CLI against ``daemon``; with ``check``, raising with its output on failure."""
    env = dict(os.environ, DOCKER_HOST=daemon.host)
    cli = shutil.which("docker")
    if cli is None:
        raise RuntimeError("no docker CLI on PATH (apt-get install docker.io)")
    r = subprocess.run([cli, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:2])} failed ({r.returncode}):\n{r.stdout[-4000:]}\n"
                           f"{r.stderr[-4000:]}")
    return r


def build_image(daemon: Dockerd, tars: Tarballs, phases: Phases) -> str:
    """Import the base and build ``deploy/Dockerfile`` on it; returns the image tag."""
    base = f"ferry-test-base:{base_key()}"
    with phases.phase("import base"):
        docker_cli(daemon, "import", str(tars.base), base)
    args = ["build", "--network", "host", "--build-arg", f"BASE={base}", "-f", str(ROOT / "deploy" / "Dockerfile"),
            "-t", IMAGE, str(ROOT)]
    # BuildKit: metadata instructions cost nothing, where the classic builder commits a container for
    # each (a full rootfs copy on vfs: 113 s against 64 s here). A docker CLI without the buildx plugin
    # refuses BuildKit; Debian's docker.io CLI has it built in, so each CLI on PATH is tried.
    env = dict(os.environ, DOCKER_HOST=daemon.host, DOCKER_BUILDKIT="1")
    tried: list[str] = []
    with phases.phase("docker build"):
        for cli in docker_clis():
            r = subprocess.run([cli, *args], env=env, capture_output=True, text=True, timeout=1200)
            if r.returncode == 0:
                return IMAGE
            tried.append(f"{cli}: {r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    raise RuntimeError("no docker CLI could build the image with BuildKit:\n" + "\n".join(tried))


@dataclass
class BuiltImages:
    ferry: str
    redis: str
    phases: Phases


def redis_image(daemon: Dockerd, tars: Tarballs, phases: Phases) -> str:
    """Debian's redis-server on the same base, standing in for the official redis image."""
    tag = f"ferry-test-redis:{base_key()}"
    with phases.phase("import redis"):
        docker_cli(daemon, "import", str(tars.redis), tag)
    return tag


@dataclass
class PhaseReport:
    """A plugin printing, in the terminal summary, how long each phase of the deploy suite took."""

    phases: Phases

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.phases.seconds:
            terminalreporter.write_line(f"deploy suite phases: {self.phases.line()}")


@pytest.fixture(scope="session")
def deploy_dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    """A daemon of the deploy suite's own: its build cache, images and volumes stay out of the way of
    the docker engine tests, which count the dangling images and build cache their cleanups prune."""
    yield from session_dockerd(tmp_path_factory, "deploy-dockerd")


@pytest.fixture(scope="session")
def ferry_images(deploy_dockerd: Dockerd, request: pytest.FixtureRequest) -> BuiltImages:
    """The ferry image (built once per session) and the Redis image, on the deploy suite's dockerd."""
    if not shutil.which("debootstrap"):
        pytest.skip("debootstrap is not installed (apt-get install debootstrap); CI installs it")
    phases = Phases()
    request.config.pluginmanager.register(PhaseReport(phases), "ferry-deploy-phases")
    tars = rootfs_tarballs(phases)
    return BuiltImages(build_image(deploy_dockerd, tars, phases), redis_image(deploy_dockerd, tars, phases),
                       phases)
