"""Reading a blob's bytes at the source, once and in order, hashed and counted as they pass.

The bytes come from an ``Opener`` (the source registry, a ranged fetch of it, or a file
in the node cache), which can start again from any offset: a dropped connection resumes
where the reader stopped. What is read from the registry may be copied into the node
cache on the way (``CacheTee``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import httpx

from config.reference import Reference
from workers.engine.blob_endpoints import get_blob
from workers.engine.errors import DigestMismatch, RegistryError, TransportError, transport_error
from workers.engine.manifests import Descriptor
from workers.engine.protocols import ProgressFn
from workers.engine.transport import RegistryTransport

if TYPE_CHECKING:
    from workers.engine.cache import BlobCache

log = logging.getLogger(__name__)

# A blob's bytes from an offset, and how to stop reading them early.
Stream = tuple[Iterator[bytes], Callable[[], None]]
Opener = Callable[[int], Stream]

# Size of the pieces read from a cached file and written to the destination: the memory
# a transfer holds at once, whatever the blob's size.
PIECE_SIZE = 1024 * 1024


def remote_opener(transport: RegistryTransport, src: Reference, digest: str) -> Opener:
    """The blob as the source registry serves it, one GET per offset."""
    def open_at(offset: int) -> Stream:
        r = get_blob(transport, src, digest, offset)
        # No chunk size: pieces come as they arrive, so a cut loses nothing already read.
        it = r.iter_bytes()
        if offset and r.status_code == 200:
            it = _skip(it, offset)  # no Range support: read past what was sent
        return it, r.close
    return open_at


def file_opener(path: Path) -> Opener:
    """The blob as the node cache holds it."""
    def open_at(offset: int) -> Stream:
        f = open(path, "rb")  # noqa: SIM115 - closed by the reader
        f.seek(offset)
        return iter(lambda: f.read(PIECE_SIZE), b""), f.close
    return open_at


class CacheTee:
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


class BlobReader:
    """The blob's bytes, read once in order, hashed and counted as they pass.

    A failing source does not raise inside a request body: the pieces just stop and the
    error is kept in ``error``, so the chunk that carried them still completes cleanly.
    """

    def __init__(self, open_at: Opener, desc: Descriptor, tee: CacheTee | None, remote: bool) -> None:
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

    def rewind_to_start(self) -> None:
        self.rewind((0, hashlib.new(self.hasher.name)))

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


def _skip(it: Iterator[bytes], n: int) -> Iterator[bytes]:
    for piece in it:
        if n >= len(piece):
            n -= len(piece)
            continue
        yield piece[n:]
        n = 0
