"""deploy/ferry-worker@.service: systemd accepts it, and it runs a warm-shutting-down worker as ferry."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.workers import ROOT

pytestmark = pytest.mark.deploy

UNIT = ROOT / "deploy" / "ferry-worker@.service"
INSTALLED_PYTHON = "/opt/ferry/.venv/bin/python"


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_the_unit_runs_a_worker_that_shuts_down_warm() -> None:
    d = directives(UNIT.read_text())
    assert d["ExecStart"] == [f"{INSTALLED_PYTHON} -m workers --node %i"]
    assert d["User"] == ["ferry"]
    assert d["KillSignal"] == ["SIGTERM"]  # Celery's warm shutdown
    # As long as the Kubernetes workers' grace period (deploy/k8s/worker.yaml).
    assert int(d["TimeoutStopSec"][0]) == 3600
    assert d["EnvironmentFile"] == ["/etc/ferry/worker.env"]
    assert d["Environment"] == ["FERRY_CACHE__DIR=/var/cache/ferry"] and d["CacheDirectory"] == ["ferry"]


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    # As installed, with this checkout's interpreter standing in for /opt/ferry/.venv/bin/python.
    unit = tmp_path / "ferry-worker@node1.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_PYTHON, sys.executable))
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stdout + r.stderr
    broken = tmp_path / "ferry-worker@node2.service"
    broken.write_text(unit.read_text().replace("KillSignal=SIGTERM", "KillSignal=SIGWARM"))
    r = subprocess.run([analyze, "verify", str(broken)], capture_output=True, text=True, timeout=60)
    assert "SIGWARM" in r.stderr  # the check is not vacuous
