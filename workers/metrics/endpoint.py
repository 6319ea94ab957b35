"""Turning a worker's metrics on: its files directory, its endpoint, its recorder."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from config.settings import FerrySettings
from contract.batches import BatchStore
from contract.broker import SYNC_QUEUE, node_queue
from workers import runtime
from workers.engine.cache import BlobCache
from workers.metrics import Recorder
from workers.metrics.directory import default_directory, use_directory
from workers.presence import Presence

if TYPE_CHECKING:
    from prometheus_client.registry import Collector


def start(s: FerrySettings) -> Recorder:
    """Serve this worker's metrics on ``s.metrics_port`` and return the recorder its processes count
    into. Call in the worker's main process before the pool starts. Raises OSError when the port
    cannot be bound."""
    assert s.metrics_port is not None and s.broker_url is not None
    directory = Path(os.path.expanduser(s.metrics_dir)) if s.metrics_dir else default_directory(s.metrics_port)
    use_directory(directory)
    # prometheus_client picks its storage when first imported, so the modules using it come only now.
    from workers.metrics.cluster import ClusterCollector
    from workers.metrics.exporter import NodeCache, serve
    from workers.metrics.families import PrometheusRecorder

    broker = s.broker_url.get_secret_value()
    results = (s.result_url or s.broker_url).get_secret_value()
    presence = Presence.from_url(broker)
    collectors: list[Collector] = [ClusterCollector(
        presence.client, BatchStore.from_url(results, s.result_ttl), presence,
        owner=f"{socket.gethostname()}:{os.getpid()}", sync_queue=SYNC_QUEUE, node_queue=node_queue,
        batch_ttl=float(s.result_ttl))]
    if s.cache.enabled:
        collectors.append(NodeCache(s.node, BlobCache(runtime.cache_dir(s), runtime.cache_policy(s))))
    recorder = PrometheusRecorder()
    serve(s.metrics_port, s.metrics_address, directory, collectors)
    return recorder
