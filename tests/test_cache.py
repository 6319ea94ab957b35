"""The node blob cache on real files, with leases and writers in separate processes."""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers.engine.cache import BlobCache, CacheDigestMismatch, CachePolicy
from workers.engine.errors import DigestMismatch
from workers.engine.protocols import CleanupStats

REPO = Path(__file__).resolve().parents[1]
BIG = 1 << 60  # a keep_bytes no test reaches


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def put(cache: BlobCache, data: bytes) -> str:
    d = digest_of(data)
    with cache.writer(d, len(data)) as f:
        f.write(data)
    return d


def age(cache: BlobCache, digest: str, seconds_ago: float, now: float) -> None:
    path = cache.get(digest)
    assert path is not None
    os.utime(path, (now - seconds_ago, now - seconds_ago))


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def temps(cache: BlobCache) -> list[Path]:
    return [p for p in (cache.root / "sha256").iterdir() if p.name.startswith(".tmp-")]


def usage(cache: BlobCache) -> tuple[int, int]:
    """(bytes, blobs) of the complete blobs in the cache, read from its directories."""
    blobs = [p for alg in ("sha256", "sha384", "sha512") if (cache.root / alg).is_dir()
             for p in (cache.root / alg).iterdir() if not p.name.startswith(".tmp-")]
    return sum(p.stat().st_size for p in blobs), len(blobs)


def policy(**kw: float) -> CachePolicy:
    base: dict[str, float] = {"keep_duration": 3600, "keep_bytes": BIG, "min_free_bytes": 0}
    base.update(kw)
    return CachePolicy(**base)  # type: ignore[arg-type]


def run_py(code: str, *args: str, stdin: int | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


LEASE_HOLDER = """
    import sys
    from pathlib import Path
    from workers.engine.cache import BlobCache, CachePolicy
    cache = BlobCache(Path(sys.argv[1]), CachePolicy())
    with cache.lease(sys.argv[2]):
        print("held", flush=True)
        sys.stdin.readline()
"""


class HeldLease:
    """A lease held by another process until ``release()``."""

    def __init__(self, root: Path, digest: str) -> None:
        self.proc = run_py(LEASE_HOLDER, str(root), digest, stdin=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "held", self.proc.stderr.read() if self.proc.stderr else ""

    def release(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        assert self.proc.returncode == 0


@pytest.fixture
def held(tmp_path: Path) -> Iterator[list[HeldLease]]:
    leases: list[HeldLease] = []
    yield leases
    for lease in leases:
        lease.release()


def test_write_verifies_and_publishes_atomically(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "c", policy())
    data = os.urandom(300_000)
    d = digest_of(data)
    assert cache.get(d) is None
    with cache.writer(d, len(data)) as f:
        for i in range(0, len(data), 65536):
            f.write(memoryview(data)[i : i + 65536])
        # Not visible until the writer has verified it.
        assert cache.get(d) is None
    path = cache.get(d)
    assert path == tmp_path / "c" / "sha256" / d.removeprefix("sha256:")
    assert path.read_bytes() == data
    assert usage(cache) == (len(data), 1)
    assert temps(cache) == []
    # Unknown size is allowed; the digest still has to match.
    d2 = digest_of(b"x" * 10)
    with cache.writer(d2) as f:
        f.write(b"x" * 10)
    assert usage(cache) == (len(data) + 10, 2)


def test_other_digest_algorithms_have_their_own_directories(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "c", policy(keep_bytes=0))
    data = b"long digest" * 50
    for algorithm in ("sha384", "sha512"):
        d = f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
        with cache.writer(d, len(data)) as f:
            f.write(data)
        assert cache.get(d) == tmp_path / "c" / algorithm / d.partition(":")[2]
        # The same bytes under another algorithm's name are a mismatch, not an alias.
        wrong = f"{algorithm}:" + digest_of(data).removeprefix("sha256:").ljust(len(d) - len(algorithm) - 1, "0")
        with pytest.raises(CacheDigestMismatch), cache.writer(wrong, len(data)) as f:
            f.write(data)
    assert usage(cache) == (2 * len(data), 2)
    assert cache.cleanup().freed_items == 2


def test_mismatches_and_failures_leave_nothing_behind(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "c", policy())
    data = b"real content" * 1000
    d = digest_of(data)

    with pytest.raises(CacheDigestMismatch, match="hashes to"), cache.writer(d, len(data)) as f:
        f.write(data[:-1] + b"X")
    with pytest.raises(CacheDigestMismatch, match="expected"), cache.writer(d, len(data)) as f:
        f.write(data[:-1])
    with pytest.raises(CacheDigestMismatch, match="larger"), cache.writer(d, len(data)) as f:
        f.write(data + b"more")
    with pytest.raises(ConnectionError), cache.writer(d, len(data)) as f:
        f.write(data[:100])
        raise ConnectionError("source went away")

    # One error type for the engine to catch, never retried as if the network had failed.
    assert issubclass(CacheDigestMismatch, DigestMismatch) and not CacheDigestMismatch("x").temporary
    assert cache.get(d) is None
    assert temps(cache) == []
    assert usage(cache) == (0, 0)


@pytest.mark.parametrize(
    "bad",
    [
        "../../etc/passwd",
        "sha256:../../../etc/passwd",
        "sha256:" + "a" * 63 + "/",
        "sha256:" + "A" * 64,
        "sha256:" + "a" * 64 + "/../x",
        "sha256:" + "a" * 64 + "\n",
        "sha512:" + "a" * 127,
        "sha1:" + "a" * 40,
        "md5:" + "a" * 32,
        "/etc/passwd",
        "",
    ],
)
def test_bad_digests_are_rejected_before_touching_disk(tmp_path: Path, bad: str) -> None:
    cache = BlobCache(tmp_path / "c", policy())
    before = files_under(tmp_path)
    with pytest.raises(ValueError):
        cache.get(bad)
    with pytest.raises(ValueError), cache.writer(bad, 1) as f:
        f.write(b"x")
    with pytest.raises(ValueError), cache.lease(bad):
        pass
    assert files_under(tmp_path) == before


def test_keep_bytes_removes_least_recently_used_first(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "c", policy(keep_bytes=2500))
    now = time.time()
    ds = [put(cache, bytes([i]) * 1000) for i in range(5)]
    for i, d in enumerate(ds):
        age(cache, d, 100 - i * 10, now)  # ds[0] oldest ... ds[4] newest
    # Reading the oldest makes it the most recently used.
    assert cache.get(ds[0]) is not None

    stats = cache.cleanup()
    assert stats == CleanupStats(freed_bytes=3000, freed_items=3, kept_bytes=2000, kept_items=2)
    assert [cache.get(d) is not None for d in ds] == [True, False, False, False, True]
    assert usage(cache) == (2000, 2)


def test_keep_duration_expires_unused_entries(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "c", policy(keep_duration=600))
    now = time.time()
    old, fresh = put(cache, b"old" * 100), put(cache, b"fresh" * 100)
    age(cache, old, 601, now)
    age(cache, fresh, 599, now)

    stats = cache.cleanup(now=now)
    assert (stats.freed_items, stats.freed_bytes, stats.kept_items) == (1, 300, 1)
    assert cache.get(old) is None
    assert cache.get(fresh) is not None
    # Later, the survivor has aged out as well.
    assert cache.cleanup(now=now + 3600).freed_items == 1
    assert usage(cache) == (0, 0)


def test_min_free_bytes_evicts_everything_unleased(tmp_path: Path, held: list[HeldLease]) -> None:
    cache = BlobCache(tmp_path / "c", policy(min_free_bytes=BIG))
    ds = [put(cache, bytes([i]) * 500) for i in range(3)]
    held.append(HeldLease(cache.root, ds[1]))
    stats = cache.cleanup()
    assert (stats.freed_items, stats.kept_items, stats.kept_bytes) == (2, 1, 500)
    assert [cache.get(d) is not None for d in ds] == [False, True, False]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A private 8 MiB tmpfs: its free space moves only with what the test writes."""
    root = tmp_path / "fs"
    root.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(root)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {r.stderr.strip()}")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=True)


def test_min_free_bytes_evicts_oldest_first_and_only_until_the_floor(small_fs: Path) -> None:
    mib = 1024 * 1024
    cache = BlobCache(small_fs / "c", policy())
    now = time.time()
    ds = [put(cache, bytes([i]) * mib) for i in range(5)]
    for i, d in enumerate(ds):
        age(cache, d, 100 - i * 10, now)  # ds[0] oldest ... ds[4] newest
    # Two and a half blobs short of the floor: three must go, the oldest, and no more.
    cache.policy = policy(min_free_bytes=cache.free_bytes() + 5 * mib // 2)
    stats = cache.cleanup(now=now)
    assert (stats.freed_items, stats.freed_bytes, stats.kept_items) == (3, 3 * mib, 2)
    assert [cache.get(d) is not None for d in ds] == [False, False, False, True, True]
    assert cache.free_bytes() >= cache.policy.min_free_bytes
    assert cache.cleanup(now=now).freed_items == 0  # the floor is met: nothing else goes


def test_entries_leased_by_another_process_survive_cleanup(tmp_path: Path, held: list[HeldLease]) -> None:
    cache = BlobCache(tmp_path / "c", policy(keep_bytes=0, keep_duration=60))
    now = time.time()
    expired, young = put(cache, b"e" * 1000), put(cache, b"y" * 1000)
    other = put(cache, b"o" * 1000)
    age(cache, expired, 3600, now)
    held.append(HeldLease(cache.root, expired))
    held.append(HeldLease(cache.root, young))

    stats = cache.cleanup(now=now)
    # Over keep_bytes and past keep_duration, the leased ones stay; only ``other`` goes.
    assert (stats.freed_items, stats.kept_items, stats.kept_bytes) == (1, 2, 2000)
    assert cache.get(other) is None
    assert cache.get(expired) is not None and cache.get(young) is not None

    for lease in held:
        lease.release()
    held.clear()
    assert cache.cleanup().freed_items == 2
    assert usage(cache) == (0, 0)
    # Lease files of removed blobs are swept too.
    assert list((cache.root / "leases").iterdir()) == []


def test_lease_taken_in_this_process_also_protects(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "c", policy(keep_bytes=0))
    d = put(cache, b"z" * 10)
    with cache.lease(d):
        assert cache.cleanup().kept_items == 1
    assert cache.cleanup().freed_items == 1


CONCURRENT_WRITER = """
    import os, sys, time
    from pathlib import Path
    from workers.engine.cache import BlobCache, CachePolicy
    root, digest, data_path, go = sys.argv[1:5]
    data = Path(data_path).read_bytes()
    cache = BlobCache(Path(root), CachePolicy())
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    with cache.writer(digest, len(data)) as f:
        for i in range(0, len(data), 16384):
            f.write(data[i:i + 16384])
            time.sleep(0.002)
    print("done", flush=True)
"""


def test_two_processes_writing_the_same_blob_end_with_one_valid_file(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "c", policy())
    data = os.urandom(16384 * 40)
    d = digest_of(data)
    src = tmp_path / "data"
    src.write_bytes(data)
    go = tmp_path / "go"
    procs = [run_py(CONCURRENT_WRITER, str(cache.root), d, str(src), str(go)) for _ in range(2)]
    # Both writers are running when released together.
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    go.touch()
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert out.strip() == "done"
    path = cache.get(d)
    assert path is not None and path.read_bytes() == data
    assert temps(cache) == []
    assert usage(cache) == (len(data), 1)


def test_stale_temp_files_are_swept_but_live_writes_are_not(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "c", policy())
    now = time.time()
    blobs = cache.root / "sha256"
    dead = blobs / (".tmp-" + "a" * 64 + "-123-deadbeef")
    dead.write_bytes(b"partial" * 10)
    os.utime(dead, (now - 7200, now - 7200))
    recent = blobs / (".tmp-" + "b" * 64 + "-124-cafecafe")
    recent.write_bytes(b"partial")
    odd = blobs / ".tmp-garbage"
    odd.write_bytes(b"??")
    os.utime(odd, (now - 7200, now - 7200))

    data = b"live" * 100
    d = digest_of(data)
    with cache.writer(d, len(data)) as f:
        f.write(data[:10])
        (live,) = [p for p in temps(cache) if d.removeprefix("sha256:") in p.name]
        os.utime(live, (now - 7200, now - 7200))  # looks stale, but its writer holds a lease
        stats = cache.cleanup(now=now)
        assert live.exists()
        f.write(data[10:])

    assert stats.freed_items == 2 and stats.freed_bytes == 72
    assert not dead.exists() and not odd.exists()
    assert recent.exists()
    assert cache.get(d) is not None


def test_one_cleanup_at_a_time(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "c", policy(keep_bytes=0))
    d = put(cache, b"q" * 100)
    holder = run_py(
        """
        import fcntl, os, sys
        fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        sys.stdin.readline()
    """,
        str(cache.root / ".cleanup.lock"),
        stdin=subprocess.PIPE,
    )
    assert holder.stdout is not None and holder.stdin is not None
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cache.cleanup() == CleanupStats()
        assert cache.get(d) is not None
    finally:
        holder.stdin.close()
        holder.wait(10)
        holder.stdout.close()
        if holder.stderr is not None:
            holder.stderr.close()
    assert cache.cleanup().freed_items == 1
    # The lock is released on return, so a second call in this process runs too.
    fd = os.open(cache.root / ".cleanup.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
