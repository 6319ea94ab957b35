"""The engine package stays free of Celery and keeps its layers pointing one way; the cluster
package sees the engine only through its protocols."""

from __future__ import annotations

import re

import workers.engine
from tests.support.imports import ROOT, imports, modules

WORKERS = ROOT / "workers"
ENGINE = WORKERS / "engine"
CLUSTER = WORKERS / "cluster"
# Each module may import only modules of a lower rank. Every engine module is listed.
RANKS = {
    "errors": 0,
    "protocols": 0,
    "tls": 0,
    "local_coordinator": 0,
    "lanes": 0,
    "retry": 1,
    "cache": 1,
    "throttle": 1,
    "keychain": 1,
    "challenges": 1,
    "results": 1,
    "docker_plan": 1,
    "auth": 2,
    "docker_daemon": 2,
    "transport": 3,
    "manifests": 4,
    "blob_endpoints": 4,
    "tags": 4,
    "blob_reader": 5,
    "prune": 5,
    "ranges": 6,
    "blob_upload": 6,
    "blobs": 7,
    "copy": 8,
    "referrers": 9,
    "plan": 9,
    "registry": 10,
    "docker": 10,
}
# Only the task layer may import these (metrics included: the engine reports to an Observer).
TASK_LAYER = ("celery", "kombu", "producer", "prometheus_client")


def test_every_engine_module_has_a_rank() -> None:
    found = {p.relative_to(ENGINE).with_suffix("").as_posix() for p in modules(ENGINE)} - {"__init__"}
    assert found - RANKS.keys() == set(), "engine modules without a layer: add them to RANKS"
    assert RANKS.keys() - found == set(), "RANKS names modules that no longer exist"


def test_engine_docstring_lists_the_same_layers() -> None:
    doc = workers.engine.__doc__ or ""
    listed = {name.strip(): int(rank) for rank, names in re.findall(r"^\s*(\d+)\s+(\w.*)$", doc, re.M)
              for name in names.split(",")}
    assert listed == RANKS


def test_engine_never_imports_celery_or_the_task_layer() -> None:
    for path in modules(ENGINE):
        for name in imports(path):
            top = name.split(".")[0]
            assert top not in TASK_LAYER, f"{path.name} imports {name}"
            if top == "workers":
                assert name.startswith("workers.engine"), f"{path.name} imports {name}"


def test_layers_only_import_downwards() -> None:
    for path in modules(ENGINE):
        if path.stem == "__init__":
            continue
        own = RANKS.get(path.stem)
        assert own is not None, f"{path.name} has no layer in RANKS"
        for name in imports(path):
            parts = name.split(".")
            if parts[:2] != ["workers", "engine"] or len(parts) < 3:
                continue
            other = RANKS.get(parts[2])
            if other is not None and parts[2] != path.stem:
                assert other < own, f"{path.stem} (layer {own}) imports {parts[2]} (layer {other})"


def test_cluster_sees_the_engine_only_through_its_protocols() -> None:
    for path in modules(CLUSTER):
        for name in imports(path):
            top = name.split(".")[0]
            assert top not in TASK_LAYER, f"cluster/{path.name} imports {name}"
            if top == "workers" and name not in ("workers", "workers.engine"):
                assert name.startswith(("workers.cluster", "workers.engine.protocols")), \
                    f"cluster/{path.name} imports {name}"
