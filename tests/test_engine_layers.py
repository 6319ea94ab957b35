"""The engine package stays free of Celery and keeps its layers pointing one way."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "workers" / "engine"
# Each module may import only modules of a lower rank.
RANKS = {
    "errors": 0,
    "protocols": 0,
    "tls": 0,
    "local_coordinator": 0,
    "retry": 1,
    "cache": 1,
    "throttle": 1,
    "keychain": 1,
    "challenges": 1,
    "auth": 2,
    "transport": 3,
    "manifests": 4,
    "ranges": 4,
    "blobs": 5,
    "copy": 6,
    "registry": 7,
    "docker": 7,
}


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def engine_modules() -> list[Path]:
    mods = sorted(ENGINE.rglob("*.py"))
    assert len(mods) >= len(RANKS)
    return mods


def test_engine_never_imports_celery_or_the_task_layer() -> None:
    for path in engine_modules():
        for name in imports(path):
            top = name.split(".")[0]
            assert top not in ("celery", "kombu", "producer"), f"{path.name} imports {name}"
            if top == "workers":
                assert name.startswith("workers.engine"), f"{path.name} imports {name}"


def test_layers_only_import_downwards() -> None:
    for path in engine_modules():
        own = RANKS.get(path.stem)
        if own is None:
            continue
        for name in imports(path):
            parts = name.split(".")
            if parts[:2] != ["workers", "engine"] or len(parts) < 3:
                continue
            other = RANKS.get(parts[2])
            if other is not None and parts[2] != path.stem:
                assert other < own, f"{path.stem} (layer {own}) imports {parts[2]} (layer {other})"
