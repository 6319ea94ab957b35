"""Every metric ferry exports, and the recorder that counts a worker's part of them.

``FAMILIES`` is the one list of names, labels and help texts: the recorder builds its
metrics from it, the dashboard and alert tests check their expressions against it.
Labels carry registry hosts, outcomes and node or queue names — never credentials, tags
or digests.

Import this module only after ``workers.metrics.directory.use_directory``: prometheus_client
picks its multiprocess storage when it is first imported.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from prometheus_client import Counter, Gauge, Histogram

from config.jobs import CleanupResult, SyncResult
from config.reference import Reference

Kind = Literal["counter", "gauge", "histogram"]
# process: counted by whichever worker process did the work; node: read by each worker's
# endpoint when scraped; cluster: read from Redis by the one elected endpoint.
Source = Literal["process", "node", "cluster"]


@dataclass(frozen=True)
class Family:
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    source: Source = "process"

    def series_names(self) -> tuple[str, ...]:
        """The names its samples carry in a scrape."""
        if self.kind == "histogram":
            return tuple(f"{self.name}_{s}" for s in ("bucket", "sum", "count"))
        return (self.name,)


FAMILIES = (
    Family("ferry_images_total", "counter", "Images finished, by outcome and source registry "
           "(counted once per image, as the batch report counts them).", ("result", "source_registry")),
    Family("ferry_image_duration_seconds", "histogram", "Time to sync one image, by outcome.", ("result",)),
    Family("ferry_images_in_flight", "gauge", "Images being copied right now."),
    Family("ferry_bytes_transferred_total", "counter", "Blob bytes uploaded to destinations."),
    Family("ferry_bytes_downloaded_total", "counter", "Blob bytes read from sources and mirrors."),
    Family("ferry_blobs_total", "counter", "Blobs per destination, by what it took: copied, mounted from "
           "another repository, or skipped because the destination had it.", ("action",)),
    Family("ferry_registry_requests_total", "counter", "Registry API requests, by registry host and HTTP "
           "status (none: no response).", ("registry", "code")),
    Family("ferry_retries_total", "counter", "Retries after temporary failures: of one request, or of a "
           "whole image's task.", ("level",)),
    Family("ferry_quota_pauses_total", "counter", "Responses that said a pull quota is spent and paused "
           "the registry for the cluster.", ("registry",)),
    Family("ferry_quota_pause_end_timestamp_seconds", "gauge", "When the last quota pause of a registry "
           "ends (Unix time).", ("registry",)),
    Family("ferry_cleanup_freed_bytes_total", "counter", "Bytes freed by cleanups on this node."),
    Family("ferry_cache_bytes", "gauge", "Size of the node's blob cache.", ("node",), "node"),
    Family("ferry_queue_length", "gauge", "Messages waiting in a queue.", ("queue",), "cluster"),
    Family("ferry_batches_running", "gauge", "Batches with images not finished yet.", (), "cluster"),
    Family("ferry_workers_online", "gauge", "Workers that reported in within the last 30 s.", (), "cluster"),
)
BY_NAME = {f.name: f for f in FAMILIES}

# Seconds; from a warm HEAD pair to a large image over a slow link.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


def _counter(name: str) -> Counter:
    f = BY_NAME[name]
    return Counter(f.name, f.help, f.labels, registry=None)


def source_registry(source: str) -> str:
    try:
        return Reference.parse(source).registry
    except ValueError:
        return "invalid"


class PrometheusRecorder:
    """Counts into prometheus_client metrics; in a worker they live in per-process files that the
    worker's endpoint adds up. Label children are kept, so a count costs a dict lookup and a write."""

    def __init__(self) -> None:
        self.images = _counter("ferry_images_total")
        f = BY_NAME["ferry_image_duration_seconds"]
        self.duration = Histogram(f.name, f.help, f.labels, buckets=DURATION_BUCKETS, registry=None)
        f = BY_NAME["ferry_images_in_flight"]
        # livesum: a dead process's images are no longer in flight.
        self.in_flight_gauge = Gauge(f.name, f.help, registry=None, multiprocess_mode="livesum")
        self.transferred = _counter("ferry_bytes_transferred_total")
        self.downloaded = _counter("ferry_bytes_downloaded_total")
        self.blobs = _counter("ferry_blobs_total")
        self.requests = _counter("ferry_registry_requests_total")
        self.retries = _counter("ferry_retries_total")
        self.pauses = _counter("ferry_quota_pauses_total")
        f = BY_NAME["ferry_quota_pause_end_timestamp_seconds"]
        # max: a pause holds the whole cluster, whichever process saw it, dead or alive.
        self.pause_end = Gauge(f.name, f.help, f.labels, registry=None, multiprocess_mode="max")
        self.freed = _counter("ferry_cleanup_freed_bytes_total")
        self._request_children: dict[tuple[str, int], Counter] = {}
        self._pause_ends: dict[str, float] = {}
        self._lock = threading.Lock()
        self._request_retries = self.retries.labels("request")
        self._image_retries = self.retries.labels("image")
        self._blob_actions = {a: self.blobs.labels(a) for a in ("copied", "mounted", "skipped")}
        # Series that exist from the start at 0, so increase() sees the first failure too.
        for result in ("synced", "up_to_date", "failed"):
            self.duration.labels(result)

    # -- the engine's Observer

    def request(self, registry: str, code: int) -> None:
        child = self._request_children.get((registry, code))
        if child is None:
            child = self.requests.labels(registry, str(code) if code else "none")
            self._request_children[(registry, code)] = child
        child.inc()

    def retry(self) -> None:
        self._request_retries.inc()

    def quota_pause(self, registry: str, until: float) -> None:
        self.pauses.labels(registry).inc()
        with self._lock:
            until = max(until, self._pause_ends.get(registry, 0.0))
            self._pause_ends[registry] = until
        self.pause_end.labels(registry).set(until)

    # -- the task layer

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        with self.in_flight_gauge.track_inprogress():
            yield

    def image_finished(self, result: SyncResult) -> None:
        self.images.labels(result.status, source_registry(result.source)).inc()
        self.duration.labels(result.status).observe(result.duration_s)
        if result.bytes_transferred:
            self.transferred.inc(result.bytes_transferred)
        if result.bytes_downloaded:
            self.downloaded.inc(result.bytes_downloaded)
        for d in result.destinations:
            for action, n in (("copied", d.blobs_copied), ("mounted", d.blobs_mounted),
                              ("skipped", d.blobs_skipped)):
                if n:
                    self._blob_actions[action].inc(n)

    def image_retrying(self) -> None:
        self._image_retries.inc()

    def cleanup_finished(self, result: CleanupResult) -> None:
        if result.freed_bytes:
            self.freed.inc(result.freed_bytes)
