"""Content-addressed blob cache shared by the worker processes of one node.

Layout under ``root``::

    sha256/<hex>            complete, verified blobs (mtime = last use); also sha384/, sha512/
    sha256/.tmp-<hex>-*     writes in progress (same dir, so the final rename is atomic)
    leases/sha256-<hex>     lock files: a shared flock marks the blob in use
    .cleanup.lock           one cleanup at a time per node

Garbage collection follows BuildKit's policy names: entries unused for
``keep_duration`` go first, then the least recently used until the cache holds at most
``keep_bytes`` and the disk has ``min_free_bytes`` free. Leased entries are never removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from typing_extensions import Buffer

from config import defaults
from config.reference import DIGEST_RE
from workers.engine.errors import DigestMismatch
from workers.engine.protocols import CleanupStats

_TMP_PREFIX = ".tmp-"
# A temp file untouched this long belongs to a writer that died.
STALE_TEMP_SECONDS = 3600.0
# The digest algorithms DIGEST_RE admits, each with its own directory.
_ALGORITHMS = ("sha256", "sha384", "sha512")


class CacheDigestMismatch(DigestMismatch):
    """The bytes written to the cache do not match the expected digest or size."""


@dataclass(frozen=True)
class CachePolicy:
    keep_duration: float = defaults.CACHE_KEEP_DURATION
    keep_bytes: int = defaults.CACHE_KEEP_BYTES
    min_free_bytes: int = defaults.CACHE_MIN_FREE_BYTES


@dataclass(frozen=True, order=True)
class _Key:
    """A validated digest: ``algorithm`` names the directory, ``hex`` the file."""

    algorithm: str
    hex: str

    @property
    def lease_name(self) -> str:
        return f"{self.algorithm}-{self.hex}"

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def _key(digest: str) -> _Key:
    """Validate before any path is built: only ``<sha256|sha384|sha512>:<lowercase hex>`` passes."""
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise ValueError(f"invalid blob digest: {digest!r}")
    algorithm, _, hexd = digest.partition(":")
    return _Key(algorithm, hexd)


def _key_from_name(algorithm: str, name: str) -> _Key | None:
    """The key a file or temp-file name stands for, or None for anything else."""
    try:
        return _key(f"{algorithm}:{name}")
    except ValueError:
        return None


class _HashingFile(io.FileIO):
    """A raw file that hashes what it writes and refuses to grow past the expected size."""

    def __init__(self, fd: int, algorithm: str, limit: int | None) -> None:
        super().__init__(fd, "wb", closefd=True)
        self.hasher = hashlib.new(algorithm)
        self.written = 0
        self._limit = limit

    def write(self, b: Buffer, /) -> int:
        view = memoryview(b).cast("B")
        if self._limit is not None and self.written + len(view) > self._limit:
            raise CacheDigestMismatch(f"blob larger than its declared size {self._limit}")
        done = 0
        while done < len(view):  # raw writes may be short; callers expect all bytes taken
            n = super().write(view[done:])
            if n is None:  # pragma: no cover - only for non-blocking fds
                continue
            done += n
        self.hasher.update(view)
        self.written += done
        return done


class BlobCache:
    def __init__(self, root: Path, policy: CachePolicy) -> None:
        self.root = Path(root)
        self.policy = policy
        self._leases = self.root / "leases"
        self._leases.mkdir(parents=True, exist_ok=True)
        for algorithm in _ALGORITHMS:
            (self.root / algorithm).mkdir(exist_ok=True)

    def _path(self, key: _Key) -> Path:
        return self.root / key.algorithm / key.hex

    # -- lookups -----------------------------------------------------------------------

    def path_for(self, digest: str) -> Path:
        return self._path(_key(digest))

    def get(self, digest: str) -> Path | None:
        """The blob's path when it is complete; marks it recently used."""
        path = self.path_for(digest)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    def size(self) -> int:
        """Bytes held in complete blobs (the node's cache gauge)."""
        return sum(size for _, size, _ in self._entries())

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    # -- leases ------------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self, digest: str) -> Iterator[None]:
        """Hold the blob in use (shared flock) so no cleanup on this node removes it."""
        fd = self._open_locked(_key(digest), fcntl.LOCK_SH)
        try:
            yield
        finally:
            os.close(fd)

    def _open_locked(self, key: _Key, op: int) -> int:
        """Open and flock the lease file; return the fd, or raise BlockingIOError (non-blocking op).

        Cleanup unlinks lease files while holding them exclusively, so after locking we
        check the path still names our inode; if not, we locked an orphan and retry.
        """
        path = self._leases / key.lease_name
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, op)
                try:
                    same = os.stat(path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                return fd
            os.close(fd)

    def _try_exclusive(self, key: _Key) -> int | None:
        try:
            return self._open_locked(key, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None

    def _release_exclusive(self, key: _Key, fd: int) -> None:
        """Drop a lease file we hold exclusively (nobody uses the blob now)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._leases / key.lease_name)
        os.close(fd)

    # -- writing -----------------------------------------------------------------------

    @contextlib.contextmanager
    def writer(self, digest: str, size: int | None = None) -> Iterator[BinaryIO]:
        """Write a blob; on clean exit it is verified and atomically put in place.

        On an exception or a size/digest mismatch the partial file is removed and the
        error raised. If another process completed the same blob first, ours is dropped.
        """
        key = _key(digest)
        final = self._path(key)
        with self.lease(digest):
            tmp = final.with_name(f"{_TMP_PREFIX}{key.hex}-{os.getpid()}-{secrets.token_hex(4)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            f = _HashingFile(fd, key.algorithm, size)
            try:
                try:
                    yield f
                    if size is not None and f.written != size:
                        raise CacheDigestMismatch(f"blob {digest}: wrote {f.written} bytes, expected {size}")
                    got = f"{key.algorithm}:{f.hasher.hexdigest()}"
                    if got != digest:
                        raise CacheDigestMismatch(f"blob {digest}: content hashes to {got}")
                    os.fsync(f.fileno())
                finally:
                    f.close()
                if final.exists():
                    os.unlink(tmp)
                else:
                    os.replace(tmp, final)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise

    # -- garbage collection ------------------------------------------------------------

    def _scan(self) -> Iterator[tuple[str, os.DirEntry[str]]]:
        for algorithm in _ALGORITHMS:
            with contextlib.suppress(FileNotFoundError), os.scandir(self.root / algorithm) as it:
                for e in it:
                    yield algorithm, e

    def _entries(self) -> Iterator[tuple[float, int, _Key]]:
        """(mtime, size, key) of every complete blob."""
        for algorithm, e in self._scan():
            key = _key_from_name(algorithm, e.name)
            if key is None:
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            yield st.st_mtime, st.st_size, key

    def cleanup(self, now: float | None = None) -> CleanupStats:
        """Apply the policy once; returns zero stats if another cleanup is running."""
        now = time.time() if now is None else now
        lock_fd = os.open(self.root / ".cleanup.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return CleanupStats()
            return self._cleanup_locked(now)
        finally:
            os.close(lock_fd)

    def _cleanup_locked(self, now: float) -> CleanupStats:
        freed_bytes = freed_items = 0
        errors: list[str] = []

        def remove(key: _Key | None, path: Path, seen_mtime: float | None = None) -> int | None:
            """Delete ``path`` unless ``key`` is leased or was used since we looked; bytes freed."""
            if key is None:
                return _unlink(path, errors)
            fd = self._try_exclusive(key)
            if fd is None:
                return None
            try:
                return _unlink(path, errors, seen_mtime)
            finally:
                self._release_exclusive(key, fd)

        # Temp files left by writers that died; a live writer holds its blob's lease.
        temps = [(a, e) for a, e in self._scan() if e.name.startswith(_TMP_PREFIX)]
        for algorithm, e in temps:
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if now - st.st_mtime < STALE_TEMP_SECONDS:
                continue
            hexd = e.name.removeprefix(_TMP_PREFIX).split("-", 1)[0]
            # A name we cannot parse is not a live writer's; old enough to be garbage anyway.
            got = remove(_key_from_name(algorithm, hexd), Path(e.path))
            if got is not None:
                freed_bytes += got
                freed_items += 1

        kept: list[tuple[float, int, _Key]] = []
        for mtime, size, key in sorted(self._entries()):  # oldest first
            if now - mtime > self.policy.keep_duration:
                got = remove(key, self._path(key), mtime)
                if got is not None:
                    freed_bytes += got
                    freed_items += 1
                    continue
            kept.append((mtime, size, key))

        total = sum(s for _, s, _ in kept)
        free = self.free_bytes()
        survivors: list[tuple[float, int, _Key]] = []
        for mtime, size, key in kept:
            if total <= self.policy.keep_bytes and free >= self.policy.min_free_bytes:
                survivors.append((mtime, size, key))
                continue
            got = remove(key, self._path(key), mtime)
            if got is None:
                survivors.append((mtime, size, key))
                continue
            total -= size
            free += got
            freed_bytes += got
            freed_items += 1

        self._sweep_orphan_leases()
        return CleanupStats(
            freed_bytes=freed_bytes,
            freed_items=freed_items,
            kept_bytes=sum(s for _, s, _ in survivors),
            kept_items=len(survivors),
            errors=tuple(errors),
        )

    def _sweep_orphan_leases(self) -> None:
        """Remove lease files of blobs that are gone and that nobody holds."""
        with os.scandir(self._leases) as it:
            names = [e.name for e in it]
        for name in names:
            algorithm, _, hexd = name.partition("-")
            key = _key_from_name(algorithm, hexd)
            if key is None or self._path(key).exists():
                continue
            fd = self._try_exclusive(key)
            if fd is not None:
                self._release_exclusive(key, fd)


def _unlink(path: Path, errors: list[str], seen_mtime: float | None = None) -> int | None:
    """Bytes freed by deleting ``path`` (0 when already gone); None when it was kept, because
    it changed since ``seen_mtime`` or could not be deleted (noted in ``errors``)."""
    try:
        st = path.stat()
        if seen_mtime is not None and st.st_mtime != seen_mtime:
            return None
        path.unlink()
        return st.st_size
    except FileNotFoundError:
        return 0
    except OSError as e:
        errors.append(f"{path.name}: {e.strerror or e}")
        return None
