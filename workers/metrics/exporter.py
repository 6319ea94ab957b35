"""A worker's Prometheus endpoint, served from its main process.

Every process of the worker — the pool's children under prefork, the one process under a
thread pool — counts into its own files in the worker's directory (prometheus_client's
multiprocess mode); a scrape adds them up. Counts of processes that ended stay in the total;
their share of live gauges (images in flight) goes when they exit: at once on a clean exit,
at the next scrape when one was killed.

Import this module only after ``workers.metrics.directory.use_directory``.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from celery.signals import worker_process_shutdown
from prometheus_client import CollectorRegistry, start_http_server, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from workers.engine.cache import BlobCache
from workers.metrics.families import BY_NAME


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_dead(directory: str) -> None:
    """Drop the live gauges of processes that died without a clean exit (SIGKILL, OOM)."""
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        pid = Path(path).stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not alive(int(pid)):
            mark_process_dead(int(pid), directory)  # type: ignore[no-untyped-call]


class WorkerProcesses(MultiProcessCollector):
    """The sum of the worker's process files, without the live gauges of dead processes."""

    def __init__(self, registry: CollectorRegistry, directory: str) -> None:
        super().__init__(registry, path=directory)  # type: ignore[no-untyped-call]
        self.directory = directory

    def collect(self) -> Iterable[Metric]:
        sweep_dead(self.directory)
        return super().collect()  # type: ignore[no-untyped-call,no-any-return]


class NodeCache:
    """The node's blob cache size, read when scraped."""

    def __init__(self, node: str, cache: BlobCache) -> None:
        self.node = node
        self.cache = cache

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        f = BY_NAME["ferry_cache_bytes"]
        g = GaugeMetricFamily(f.name, f.help, labels=f.labels)
        g.add_metric([self.node], self.cache.size())
        yield g


def _child_exit(**_: Any) -> None:
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        mark_process_dead(os.getpid(), directory)  # type: ignore[no-untyped-call]


def serve(port: int, address: str, directory: Path, collectors: Iterable[Collector] = ()) -> Any:
    """Start the endpoint on ``address:port`` in a background thread; returns the server.
    Raises OSError when the port cannot be bound."""
    if not getattr(values.ValueClass, "_multiprocess", False) or \
            os.environ.get("PROMETHEUS_MULTIPROC_DIR") != str(directory):
        raise RuntimeError("prometheus_client was imported before the worker's metrics directory was set")
    registry = CollectorRegistry()
    WorkerProcesses(registry, str(directory))
    for c in collectors:
        registry.register(c)
    server, _ = start_http_server(port, address, registry=registry)
    worker_process_shutdown.connect(_child_exit, weak=False)
    return server
