"""Downloading one large blob as several HTTP Range requests at once.

A registry far away gives each TCP connection only part of the link (latency, per-flow
shaping), so one big layer on one connection leaves the link idle. Here the rest of a
blob from some offset is cut into consecutive parts; up to ``parallel`` of them download
at once on a small thread pool, and their bytes are handed out strictly in order, so the
hashing, node cache and upload above still see one ordinary stream.

One retry owner: a failed part is not retried here. Its error ends the stream like a cut
connection, and the reader above resumes at its offset with a fresh fetch. A server that
answers a Range request with the whole blob (or a wrong ``Content-Range``) makes the fetch
fall back to one plain stream, and its host is not asked for ranges again.

Parts pay off only for a distant source: near one (a LAN, the same cloud region) a single
stream already fills the link, and parts would only cost requests and CPU. So a host whose
quickest recent answer (as the transport timed it) came within ``min_latency`` gets plain
streams.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import httpx

from config import defaults
from config.reference import Reference
from workers.engine.blob_endpoints import get_blob
from workers.engine.blob_reader import Opener, Stream
from workers.engine.errors import DigestMismatch, TransportError, transport_error
from workers.engine.transport import RegistryTransport

log = logging.getLogger(__name__)

# Parts below 1 MiB spend more of their time on the request round trip than on bytes.
MIN_PART = 1024 * 1024
# Memory per blob is at most parallel * MAX_PART (16 MiB by default). At 64 Mbit/s and
# 80 ms round trip a 4 MiB part moves bytes ~87% of its time; 8 MiB would add ~6% for
# twice the memory, and a worker may have several large blobs in flight.
MAX_PART = 4 * 1024 * 1024
# Response time (to headers) below which a source counts as near; WAN round trips are
# tens of milliseconds and more, a LAN's well under one.
MIN_LATENCY = 0.02
# How long close() waits for parts that are still connecting to give up on their own.
CLOSE_GRACE = 2.0
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def part_size(remaining: int, parallel: int) -> int:
    """Even parts over ``parallel`` connections, within [MIN_PART, MAX_PART]."""
    return max(MIN_PART, min(MAX_PART, -(-remaining // max(parallel, 1))))


class _NoRanges(Exception):
    """The server ignored or garbled a Range request."""


class _Cancelled(Exception):
    """The stream was closed while this part was downloading."""


@dataclass(eq=False)
class _Part:
    start: int
    end: int  # exclusive
    chunks: deque[bytes] = field(default_factory=deque)
    received: int = 0
    done: bool = False
    error: BaseException | None = None
    response: httpx.Response | None = None  # while its body is being read

    @property
    def size(self) -> int:
        return self.end - self.start


class RangeFetcher:
    """Opens source blob streams as parallel ranged GETs; one per copier, thread-safe.

    ``parallel`` below 2 turns it off; blobs smaller than ``threshold`` use one stream, and
    so do hosts that answer within ``min_latency`` seconds (0: ranges whatever the distance).
    """

    def __init__(self, transport: RegistryTransport, *, parallel: int = defaults.RANGE_PARALLEL,
                 threshold: int = defaults.RANGE_THRESHOLD, min_latency: float = MIN_LATENCY) -> None:
        self.transport = transport
        self.parallel = parallel
        self.threshold = threshold
        self.min_latency = min_latency
        self._lock = threading.Lock()
        self._no_ranges: set[str] = set()

    def supports_ranges(self, host: str) -> bool:
        with self._lock:
            return host not in self._no_ranges

    def is_near(self, host: str) -> bool:
        """Whether ``host`` answered quickly enough lately that one stream will do (a host
        not yet heard from counts as far)."""
        seen = self.transport.response_time(host)
        return seen is not None and seen < self.min_latency

    def mark_no_ranges(self, host: str) -> None:
        with self._lock:
            if host in self._no_ranges:
                return
            self._no_ranges.add(host)
        log.info("%s does not serve Range requests properly; downloading its blobs in one stream", host)

    def opener(self, src: Reference, digest: str, size: int, plain: Opener) -> Opener:
        """``plain`` wrapped: from each offset, ranged parts when they can help."""
        host = src.api_host

        def open_at(offset: int) -> Stream:
            if (self.parallel < 2 or size < self.threshold or size - offset <= MIN_PART
                    or not self.supports_ranges(host) or self.is_near(host)):
                return plain(offset)
            stream = _PartStream(self, src, digest, size, offset, plain)
            return stream.pieces, stream.close
        return open_at


class _PartStream:
    """The blob from ``offset`` on: parts fetched ahead in a window of ``parallel``, read in order."""

    def __init__(self, fetcher: RangeFetcher, src: Reference, digest: str, size: int, offset: int,
                 plain: Opener) -> None:
        self._fetcher = fetcher
        self._src = src
        self._digest = digest
        self._size = size
        self._next = offset  # first byte not yet given to a part
        self._pos = offset  # first byte not yet handed out
        self._part_size = part_size(size - offset, fetcher.parallel)
        self._plain = plain
        self._plain_close: Callable[[], None] | None = None
        self._cond = threading.Condition()
        # Parts not yet fully handed out, in order: this bounds the memory held.
        self._window: deque[_Part] = deque()
        self._futures: list[Future[None]] = []
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        self.pieces = self._pieces()

    # -- the consumer's side (one thread) --------------------------------------------

    def _pieces(self) -> Generator[bytes, None, None]:
        while self._pos < self._size:
            self._fill()
            head = self._window[0]
            with self._cond:
                while not head.chunks and not head.done and head.error is None:
                    self._cond.wait()
                piece = head.chunks.popleft() if head.chunks else None
                error = head.error
            if piece is not None:
                self._pos += len(piece)
                yield piece
            elif isinstance(error, _NoRanges):
                self._fetcher.mark_no_ranges(self._src.api_host)
                log.debug("range part of %s refused (%s); one stream from %d", self._digest, error, self._pos)
                self._stop_parts()
                it, self._plain_close = self._plain(self._pos)
                yield from it
                return
            elif error is not None:
                raise error
            else:
                self._window.popleft()

    def _fill(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self._fetcher.parallel, thread_name_prefix="ferry-range")
        if len(self._futures) > 4 * self._fetcher.parallel:
            self._futures = [f for f in self._futures if not f.done()]
        while len(self._window) < self._fetcher.parallel and self._next < self._size:
            part = _Part(self._next, min(self._next + self._part_size, self._size))
            self._next = part.end
            self._window.append(part)
            self._futures.append(self._pool.submit(self._fetch, part))

    def close(self) -> None:
        self._stop_parts()
        self.pieces.close()
        if self._plain_close is not None:
            close, self._plain_close = self._plain_close, None
            close()

    def _stop_parts(self) -> None:
        """Cancel parts not started, cut the ones downloading, and wait for their threads."""
        with self._cond:
            self._closed = True
            # A worker blocked in a read wakes up only when its socket is shut down; it then
            # closes the response itself, from its own thread.
            for part in self._window:
                if part.response is not None:
                    _shutdown(part.response)
            self._window.clear()
            self._cond.notify_all()
        pool, self._pool = self._pool, None
        if pool is None:
            return
        for f in self._futures:
            f.cancel()
        # Parts still connecting or waiting for a cluster slot cannot be interrupted; they
        # stop by themselves once their request returns.
        _, running = wait(self._futures, timeout=CLOSE_GRACE)
        pool.shutdown(wait=not running, cancel_futures=True)
        self._futures = []

    # -- the part downloads (pool threads) -------------------------------------------

    def _fetch(self, part: _Part) -> None:
        try:
            self._download(part)
        except BaseException as exc:  # handed to the consumer, which raises it in order
            with self._cond:
                part.error = exc
                self._cond.notify_all()
        else:
            with self._cond:
                part.done = True
                self._cond.notify_all()

    def _download(self, part: _Part) -> None:
        if self._closed:
            raise _Cancelled
        r = get_blob(self._fetcher.transport, self._src, self._digest, part.start, part.end)
        try:
            with self._cond:
                if self._closed:
                    raise _Cancelled
                part.response = r
            self._check(r, part)
            for chunk in r.iter_bytes():
                if self._closed:
                    raise _Cancelled
                if part.received + len(chunk) > part.size:
                    raise TransportError(f"range part at {part.start} of {self._digest} is longer "
                                         f"than the {part.size} bytes asked for", reference=str(self._src))
                with self._cond:
                    part.chunks.append(chunk)
                    part.received += len(chunk)
                    self._cond.notify_all()
            if part.received != part.size:
                raise TransportError(f"range part at {part.start} of {self._digest} ended after "
                                     f"{part.received} of {part.size} bytes", reference=str(self._src))
        except httpx.HTTPError as exc:
            if isinstance(exc, httpx.TransportError) and self._closed:
                raise _Cancelled from None
            raise transport_error(exc, reference=self._src) from exc
        finally:
            with self._cond:
                part.response = None
            r.close()

    def _check(self, r: httpx.Response, part: _Part) -> None:
        """The answer is exactly the part asked for, or says why ranges cannot be used."""
        if r.status_code != 206:
            raise _NoRanges(f"answered {r.status_code} to a Range request")
        if r.headers.get("Content-Encoding", "identity").lower() != "identity":
            raise _NoRanges("encoded range answer")
        m = _CONTENT_RANGE.fullmatch(r.headers.get("Content-Range", "").strip())
        if m is None:
            raise _NoRanges(f"Content-Range {r.headers.get('Content-Range')!r}")
        total = m.group(3)
        if total != "*" and int(total) != self._size:
            raise DigestMismatch(f"blob {self._digest} at the source has {total} bytes, its descriptor "
                                 f"says {self._size}", reference=str(self._src))
        if (int(m.group(1)), int(m.group(2)) + 1) != (part.start, part.end):
            raise _NoRanges(f"asked for bytes {part.start}-{part.end - 1}, got {m.group(0)!r}")


def _shutdown(r: httpx.Response) -> None:
    """Wake a thread blocked reading ``r`` (closing a socket from another thread does not)."""
    stream = r.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        # The plain socket's shutdown, also under TLS: SSLSocket.shutdown would unwrap it
        # under the reading thread's feet.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
