"""Packages import one way: the producer and the workers share only ``config`` and ``contract`` —
except that scheduled runs enqueue a list the way ``producer enqueue`` does, so the two worker
modules that fire them use the producer's list-to-batch path; the engine and the cluster
coordination never load Celery."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.imports import ROOT, dotted, imports, modules

CELERY = ("celery", "kombu")


def tops(package: str) -> dict[str, set[str]]:
    """module -> top-level packages it imports."""
    return {dotted(p): {n.split(".")[0] for n in imports(p)} for p in modules(ROOT / package)}


def loaded_after_importing(packages: list[str]) -> set[str]:
    """Top-level packages in sys.modules after importing every module of ``packages`` in a fresh
    interpreter: catches what a module pulls in through another."""
    names = [dotted(p) for pkg in packages for p in modules(ROOT / pkg) if p.name != "__main__.py"]
    code = ("import importlib, json, sys\n"
            f"for n in {names!r}: importlib.import_module(n)\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return set(json.loads(r.stdout))


def test_producer_never_imports_workers() -> None:
    for mod, found in tops("producer").items():
        assert "workers" not in found, f"{mod} imports workers"
    assert "workers" not in loaded_after_importing(["producer"])


def test_workers_use_the_producer_only_to_enqueue_scheduled_runs() -> None:
    importing = {mod for mod, found in tops("workers").items() if "producer" in found}
    assert importing == {"workers.beat", "workers.schedules"}


def test_contract_imports_neither_side_nor_celery() -> None:
    for mod, found in tops("contract").items():
        assert not found & {"workers", "producer", *CELERY}, f"{mod} imports {found}"


def test_engine_and_cluster_never_load_celery() -> None:
    for pkg in ("workers/engine", "workers/cluster"):
        for mod, found in tops(pkg).items():
            assert not found & {"producer", *CELERY}, f"{mod} imports {found & {'producer', *CELERY}}"
    loaded = loaded_after_importing(["workers/engine", "workers/cluster"])
    assert not loaded & set(CELERY), sorted(loaded & set(CELERY))


def test_the_producer_never_loads_celery() -> None:
    """It writes task messages itself (contract.wire): Celery and kombu would be most of its start-up."""
    for mod, found in tops("producer").items():
        assert not found & set(CELERY), f"{mod} imports {found & set(CELERY)}"
    loaded = loaded_after_importing(["producer"])
    assert not loaded & set(CELERY), sorted(loaded & set(CELERY))
