"""Copying one blob between registries without holding it in memory.

Order of preference, as in go-containerregistry and regclient: the destination
already has it (HEAD) → mount it from another repository on the same registry →
stream it: GET from the source (or read the node cache) into PATCH chunks, hashing
on the way, and commit with ``PUT ?digest=`` only once size and digest check out,
so a corrupt source is never committed. A large source blob may be fetched as several
Range requests at once (``ranges``), still read in order. A dropped source connection
resumes with ``Range: bytes=N-``; a dropped destination connection resumes from the
offset the upload session reports.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Literal

import httpx

from config.reference import Reference
from workers.engine.errors import (
    DigestMismatch,
    NotFound,
    RegistryError,
    TransportError,
    UnsupportedMediaType,
    transport_error,
)
from workers.engine.local_coordinator import LocalCoordinator
from workers.engine.manifests import Descriptor
from workers.engine.protocols import Coordinator, ProgressFn
from workers.engine.ranges import DEFAULT_THRESHOLD, MIN_LATENCY, Opener, RangeFetcher, get_blob
from workers.engine.transport import RegistryTransport

if TYPE_CHECKING:
    from workers.engine.cache import BlobCache

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 64 * 1024 * 1024
# Size of the pieces read from the source and written to the destination: the memory a
# transfer holds at once, whatever the blob's size.
PIECE_SIZE = 1024 * 1024
# Remembered (registry, digest) → repositories, for mounts; oldest forgotten first.
SEEN_LIMIT = 200_000
MAX_MOUNT_TRIES = 3

Action = Literal["skipped", "mounted", "copied"]


@dataclass(frozen=True)
class BlobResult:
    digest: str
    action: Action
    uploaded: int = 0
    downloaded: int = 0


class BlobTracker:
    """Per process: where each digest was seen on each destination registry, and which
    (registry, digest) uploads are in flight, so the same blob is never sent twice at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: OrderedDict[tuple[str, str], list[str]] = OrderedDict()
        self._flight: dict[tuple[str, str], tuple[threading.Lock, int]] = {}

    def note(self, host: str, digest: str, repository: str) -> None:
        key = (host, digest)
        with self._lock:
            repos = self._seen.pop(key, [])
            if repository not in repos:
                repos = [repository, *repos][:8]
            self._seen[key] = repos
            while len(self._seen) > SEEN_LIMIT:
                self._seen.popitem(last=False)

    def repositories(self, host: str, digest: str) -> list[str]:
        with self._lock:
            return list(self._seen.get((host, digest), ()))

    def forget(self, host: str, digest: str, repository: str) -> None:
        with self._lock:
            repos = self._seen.get((host, digest))
            if repos and repository in repos:
                repos.remove(repository)

    @contextlib.contextmanager
    def exclusive(self, host: str, digest: str) -> Iterator[None]:
        """Wait while another thread copies this digest to this registry, then hold it."""
        key = (host, digest)
        with self._lock:
            lock, users = self._flight.get(key, (threading.Lock(), 0))
            self._flight[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                lock, users = self._flight[key]
                if users == 1:
                    del self._flight[key]
                else:
                    self._flight[key] = (lock, users - 1)


# -- reading the source ----------------------------------------------------------------


class _Tee:
    """Copies what is read into the node cache; any cache trouble just stops the copy."""

    def __init__(self, cache: BlobCache, desc: Descriptor) -> None:
        self._cm = cache.writer(desc.digest, desc.size)
        self._file: IO[bytes] | None = self._cm.__enter__()

    def write(self, data: bytes | memoryview) -> None:
        if self._file is None:
            return
        try:
            self._file.write(data)
        except Exception as exc:  # a full disk must not fail the copy
            log.warning("blob cache write failed, not caching: %s", exc)
            self.discard()

    def discard(self) -> None:
        if self._file is not None:
            self._file = None
            with contextlib.suppress(Exception):
                self._cm.__exit__(RuntimeError, RuntimeError("discarded"), None)

    def commit(self) -> None:
        if self._file is not None:
            self._file = None
            try:
                self._cm.__exit__(None, None, None)
            except Exception as exc:
                log.warning("blob cache commit failed: %s", exc)


class _Reader:
    """The blob's bytes, read once in order, hashed and counted as they pass.

    A failing source does not raise inside a request body: the pieces just stop and the
    error is kept in ``error``, so the chunk that carried them still completes cleanly.
    """

    def __init__(self, open_at: Opener, desc: Descriptor, tee: _Tee | None, remote: bool) -> None:
        self._open_at = open_at
        self.desc = desc
        self.tee = tee
        self.remote = remote
        self.offset = 0
        self.downloaded = 0
        algorithm = desc.digest.split(":", 1)[0]
        if algorithm not in ("sha256", "sha384", "sha512"):
            raise DigestMismatch(f"blob {desc.digest}: unsupported digest algorithm")
        self.hasher = hashlib.new(algorithm)
        self.error: RegistryError | None = None
        self._it: Iterator[bytes] | None = None
        self._close: Callable[[], None] | None = None
        self._pending = b""

    def mark(self) -> tuple[int, Any]:
        return self.offset, self.hasher.copy()

    def rewind(self, mark: tuple[int, Any]) -> None:
        """Go back to ``mark``; the cache copy cannot follow, so it is dropped."""
        if mark[0] == self.offset:
            return
        self.close()
        self.offset, self.hasher = mark[0], mark[1].copy()
        if self.tee is not None:
            self.tee.discard()
            self.tee = None

    def close(self) -> None:
        self._pending = b""
        self._it = None
        if self._close is not None:
            close, self._close = self._close, None
            close()

    def _next(self) -> bytes:
        if self._pending:
            piece, self._pending = self._pending, b""
            return piece
        if self._it is None:
            self._it, self._close = self._open_at(self.offset)
        return next(self._it)

    def pieces(self, limit: int, progress: ProgressFn | None, *, hold_last: bool = False) -> Iterator[bytes]:
        """Up to ``limit`` bytes. With ``hold_last`` the final piece is only given out after
        the whole blob verified, so a mismatch aborts the request before its end."""
        self.error = None
        sent = 0
        held: bytes | None = None
        while sent < limit:
            try:
                piece = self._next()
            except StopIteration:
                self.close()
                if self.offset < self.desc.size:
                    self.error = TransportError(f"source ended after {self.offset} of {self.desc.size} bytes")
                break
            except RegistryError as exc:
                self.close()
                self.error = exc
                break
            except httpx.HTTPError as exc:
                self.close()
                self.error = transport_error(exc)
                break
            except OSError as exc:  # reading a cached file
                self.close()
                self.error = TransportError(f"reading cached blob failed: {exc}", temporary=False)
                break
            if not piece:
                continue
            if len(piece) > limit - sent:
                piece, self._pending = piece[: limit - sent], piece[limit - sent :]
            if self.offset + len(piece) > self.desc.size:
                self.close()
                self.error = DigestMismatch(
                    f"blob {self.desc.digest} is larger than its descriptor's {self.desc.size} bytes")
                break
            self.hasher.update(piece)
            self.offset += len(piece)
            if self.remote:
                self.downloaded += len(piece)
            if self.tee is not None:
                self.tee.write(piece)
            sent += len(piece)
            if hold_last:
                if held is not None:
                    yield held
                    if progress:
                        progress(len(held))
                held = piece
                continue
            yield piece
            if progress:
                progress(len(piece))
        if held is not None:
            if self.error is None and self.offset == self.desc.size:
                self.verify()  # raises inside the request: the body never completes
            else:
                raise self.error or TransportError("source ended early")
            yield held
            if progress:
                progress(len(held))

    def verify(self) -> None:
        if self.offset != self.desc.size:
            raise DigestMismatch(f"blob {self.desc.digest}: got {self.offset} bytes, "
                                 f"its descriptor says {self.desc.size}")
        got = f"{self.desc.digest.split(':', 1)[0]}:{self.hasher.hexdigest()}"
        if got != self.desc.digest:
            raise DigestMismatch(f"blob {self.desc.digest}: content hashes to {got}")


# -- the copier ------------------------------------------------------------------------


@dataclass
class _Session:
    location: str | None = None
    mark: tuple[int, Any] | None = None
    monolithic: bool = False


def _range_end(value: str | None) -> int | None:
    """Last byte index from an upload's ``Range: 0-N`` header."""
    if not value or "-" not in value:
        return None
    try:
        return int(value.rsplit("-", 1)[1])
    except ValueError:
        return None


class BlobCopier:
    """Copies blobs to destinations; one per engine, safe to use from many threads."""

    def __init__(
        self,
        transport: RegistryTransport,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        cache: BlobCache | None = None,
        tracker: BlobTracker | None = None,
        coordinator: Coordinator | None = None,
        range_parallel: int = 0,
        range_threshold: int = DEFAULT_THRESHOLD,
        range_min_latency: float = MIN_LATENCY,
    ) -> None:
        """``range_parallel`` > 1 downloads source blobs of at least ``range_threshold`` bytes
        as that many Range requests at once (0 or 1: one stream per blob), from sources
        slower to answer than ``range_min_latency`` seconds."""
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        self.transport = transport
        self.chunk_size = chunk_size
        self.ranges = RangeFetcher(transport, parallel=range_parallel, threshold=range_threshold,
                                   min_latency=range_min_latency)
        self.cache = cache
        self.tracker = tracker or BlobTracker()
        self.coordinator: Coordinator = coordinator or LocalCoordinator()

    def copy(self, src: Reference, dst: Reference, desc: Descriptor,
             progress: ProgressFn | None = None, *, use_cache: bool = True) -> BlobResult:
        """Make ``desc`` exist in ``dst``'s repository; raises a RegistryError on failure.

        ``use_cache`` lets the node cache serve or keep the bytes (worth it when several
        destinations want the same blob).
        """
        host = dst.api_host
        try:
            with self.tracker.exclusive(host, desc.digest):
                tried: set[str] = set()
                found = self._known(src, dst, desc.digest, tried)
                if found is not None:
                    return found
                if self.exists(dst, desc.digest):
                    self._note(dst, desc.digest)
                    return BlobResult(desc.digest, "skipped")
                # One upload of a digest per registry in the whole cluster.
                with self.coordinator.upload_lease(host, desc.digest) as held:
                    # Whoever finished first recorded it before letting go of the lease.
                    found = self._known(src, dst, desc.digest, tried)
                    if found is not None:
                        return found
                    if not held and self.exists(dst, desc.digest):
                        self._note(dst, desc.digest)
                        return BlobResult(desc.digest, "skipped")
                    result = self._upload(src, dst, desc, progress, self.cache if use_cache else None)
                    self._note(dst, desc.digest)
                    if src.api_host == host:
                        self._note(src, desc.digest)
                    return result
        except RegistryError as exc:
            raise exc.with_reference(dst) from None

    def exists(self, ref: Reference, digest: str) -> bool:
        try:
            self.transport.request("HEAD", ref.api_host, f"/v2/{ref.repository}/blobs/{digest}",
                                   reference=ref)
        except NotFound:
            return False
        return True

    def forget(self, ref: Reference, digest: str) -> None:
        """The registry no longer has ``digest`` in ``ref``'s repository (garbage-collected)."""
        self.tracker.forget(ref.api_host, digest, ref.repository)
        self.coordinator.forget_blob(ref.api_host, ref.repository, digest)

    def _note(self, ref: Reference, digest: str) -> None:
        self.tracker.note(ref.api_host, digest, ref.repository)
        self.coordinator.record_blob(ref.api_host, ref.repository, digest)

    def _known(self, src: Reference, dst: Reference, digest: str, tried: set[str]) -> BlobResult | None:
        """Skip or mount using what this process and the cluster ledger know, without a HEAD;
        repositories in ``tried`` are not asked twice."""
        ledger = self.coordinator.known_locations(dst.api_host, digest)
        if dst.repository in ledger:
            self.tracker.note(dst.api_host, digest, dst.repository)
            return BlobResult(digest, "skipped")
        for repo in self._mount_sources(src, dst, digest, ledger):
            if repo in tried:
                continue
            tried.add(repo)
            if self._mount(dst, digest, repo):
                self._note(dst, digest)
                return BlobResult(digest, "mounted")
            # Refused: the registry no longer has it there (garbage-collected).
            self.coordinator.forget_blob(dst.api_host, repo, digest)
        return None

    def _mount_sources(self, src: Reference, dst: Reference, digest: str, ledger: list[str]) -> list[str]:
        repos = []
        if src.api_host == dst.api_host and src.repository != dst.repository:
            repos.append(src.repository)
        for repo in [*ledger, *self.tracker.repositories(dst.api_host, digest)]:
            if repo != dst.repository and repo not in repos:
                repos.append(repo)
        return repos[:MAX_MOUNT_TRIES]

    def _mount(self, dst: Reference, digest: str, from_repo: str) -> bool:
        try:
            r = self.transport.request(
                "POST", dst.api_host, f"/v2/{dst.repository}/blobs/uploads/",
                params={"mount": digest, "from": from_repo}, ok=(201, 202), reference=dst)
        except RegistryError as exc:
            if exc.temporary:
                raise
            log.info("mount of %s from %s refused: %s", digest, from_repo, exc)
            return False
        if r.status_code == 201:
            return True
        # 202: the registry opened a plain upload instead; do not leave it dangling.
        if r.headers.get("Location"):
            self._cancel(dst, self.transport.resolve(dst.api_host, r.headers["Location"]))
        return False

    def _cancel(self, dst: Reference, location: str) -> None:
        with contextlib.suppress(RegistryError):
            self.transport.send("DELETE", dst.api_host, location, ok=(200, 202, 204, 404), reference=dst)

    # -- upload --------------------------------------------------------------------

    def _remote_opener(self, src: Reference, digest: str) -> Opener:
        def open_at(offset: int) -> tuple[Iterator[bytes], Callable[[], None]]:
            r = get_blob(self.transport, src, digest, offset)
            # No chunk size: pieces come as they arrive, so a cut loses nothing already read.
            it = r.iter_bytes()
            if offset and r.status_code == 200:
                it = _skip(it, offset)  # no Range support: read past what was sent
            return it, r.close
        return open_at

    def _upload(self, src: Reference, dst: Reference, desc: Descriptor,
                progress: ProgressFn | None, cache: BlobCache | None) -> BlobResult:
        with contextlib.ExitStack() as stack:
            cached = None
            if cache is not None:
                stack.enter_context(cache.lease(desc.digest))
                cached = cache.get(desc.digest)
            tee: _Tee | None = None
            if cached is not None:
                path = cached

                def open_file(offset: int) -> tuple[Iterator[bytes], Callable[[], None]]:
                    f = open(path, "rb")  # noqa: SIM115 - closed by the reader
                    f.seek(offset)
                    return iter(lambda: f.read(PIECE_SIZE), b""), f.close

                reader = _Reader(open_file, desc, None, remote=False)
            else:
                if cache is not None:
                    try:
                        tee = _Tee(cache, desc)
                    except Exception as exc:
                        log.warning("blob cache unavailable for %s: %s", desc.digest, exc)
                opener = self.ranges.opener(src, desc.digest, desc.size, self._remote_opener(src, desc.digest))
                reader = _Reader(opener, desc, tee, remote=True)
            stack.callback(reader.close)
            session = _Session()
            try:
                uploaded = self.transport.retry.call(
                    lambda: self._upload_pass(dst, desc, reader, session, progress),
                    what=f"upload of {desc.digest} to {dst.name}")
            except BaseException:
                if session.location is not None:
                    self._cancel(dst, session.location)
                if reader.tee is not None:
                    reader.tee.discard()
                raise
            if reader.tee is not None:
                reader.tee.commit()
            return BlobResult(desc.digest, "copied", uploaded=uploaded, downloaded=reader.downloaded)

    def _start(self, dst: Reference, reader: _Reader, session: _Session) -> None:
        r = self.transport.send("POST", dst.api_host, f"/v2/{dst.repository}/blobs/uploads/",
                                ok=(202,), reference=dst)
        location = r.headers.get("Location")
        if not location:
            raise RegistryError("registry opened an upload without a Location", reference=str(dst))
        session.location = self.transport.resolve(dst.api_host, location)
        reader.rewind((0, hashlib.new(reader.hasher.name)))
        session.mark = reader.mark()

    def _resync(self, dst: Reference, reader: _Reader, session: _Session) -> None:
        """After a failure: continue where the registry's upload session says it is."""
        assert session.location is not None and session.mark is not None
        try:
            r = self.transport.send("GET", dst.api_host, session.location, ok=(204, 200), reference=dst)
            end = _range_end(r.headers.get("Range"))
        except NotFound:
            end = None
        if end is not None and not session.monolithic:
            have = end + 1
            # distribution reports an empty upload as 0-0, the same as one byte.
            if end == 0 and reader.offset == 0:
                have = 0
            if have == reader.offset:
                session.mark = reader.mark()
                return
            if have == session.mark[0]:
                reader.rewind(session.mark)
                return
        self._cancel(dst, session.location)
        session.location = None
        self._start(dst, reader, session)

    def _upload_pass(self, dst: Reference, desc: Descriptor, reader: _Reader, session: _Session,
                     progress: ProgressFn | None) -> int:
        host = dst.api_host
        if session.location is None:
            # The POST comes first: it earns the push token before any streamed body.
            self._start(dst, reader, session)
        else:
            self._resync(dst, reader, session)
        assert session.location is not None
        if session.monolithic:
            return self._put_whole(dst, desc, reader, session, progress)
        start = reader.offset
        while reader.offset < desc.size:
            session.mark = reader.mark()
            n = min(self.chunk_size, desc.size - reader.offset)
            try:
                r = self.transport.send(
                    "PATCH", host, session.location, ok=(202, 204), reference=dst,
                    headers={"Content-Type": "application/octet-stream"},
                    content=reader.pieces(n, progress))
            except RegistryError as exc:
                if exc.status in (405, 501) or isinstance(exc, UnsupportedMediaType):
                    # This registry takes uploads in one PUT only.
                    log.info("%s refuses chunked uploads; sending %s in one request", host, desc.digest)
                    session.monolithic = True
                    session.location = None
                    self._start(dst, reader, session)
                    return self._put_whole(dst, desc, reader, session, progress)
                raise
            if r.headers.get("Location"):
                session.location = self.transport.resolve(host, r.headers["Location"])
            end = _range_end(r.headers.get("Range"))
            if end is not None and end + 1 != reader.offset and not (end == 0 and reader.offset == 0):
                raise TransportError(f"registry holds {end + 1} bytes of the upload, {reader.offset} were sent")
            if reader.error is not None:
                raise reader.error
        reader.verify()
        commit = httpx.URL(session.location).copy_merge_params({"digest": desc.digest})
        self.transport.send("PUT", host, commit, ok=(201, 204), reference=dst,
                            headers={"Content-Type": "application/octet-stream"}, content=b"")
        session.location = None
        return reader.offset - start

    def _put_whole(self, dst: Reference, desc: Descriptor, reader: _Reader, session: _Session,
                   progress: ProgressFn | None) -> int:
        assert session.location is not None
        reader.rewind((0, hashlib.new(reader.hasher.name)))
        commit = httpx.URL(session.location).copy_merge_params({"digest": desc.digest})
        body = reader.pieces(desc.size, progress, hold_last=True) if desc.size else iter(())
        if not desc.size:
            reader.verify()
        self.transport.send("PUT", dst.api_host, commit, ok=(201, 204), reference=dst,
                            headers={"Content-Type": "application/octet-stream"}, content=body)
        session.location = None
        return desc.size


def _skip(it: Iterator[bytes], n: int) -> Iterator[bytes]:
    for piece in it:
        if n >= len(piece):
            n -= len(piece)
            continue
        yield piece[n:]
        n = 0
