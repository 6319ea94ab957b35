"""Where a worker's processes keep their counts: one directory of prometheus_client files per worker.

Stdlib only: it must run before prometheus_client is first imported, which picks its storage then.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def default_directory(port: int) -> Path:
    """One directory per port: two workers on a machine never share (or empty) each other's."""
    return Path(tempfile.gettempdir()) / f"ferry-metrics-{port}"


def use_directory(path: Path) -> None:
    """Make ``path`` where this worker's processes keep their counts, emptied of an earlier run's.

    Must run before prometheus_client is first imported: it picks its storage then."""
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.db"):
        old.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
