"""Copying one blob between registries without holding it in memory: the policy.

Order of preference, as in go-containerregistry and regclient: the destination already
has it (the cluster ledger or a HEAD says so) → mount it from another repository on the
same registry → stream it from the source or the node cache (``blob_reader``) into an
upload session (``blob_upload``). One upload of a digest per registry at a time: per
process through the blob tracker, across the cluster through the coordinator's lease.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from config import defaults
from config.reference import Reference
from workers.engine.blob_endpoints import blob_exists, mount_blob
from workers.engine.blob_reader import BlobReader, CacheTee, file_opener, remote_opener
from workers.engine.blob_upload import UploadSession
from workers.engine.errors import RegistryError
from workers.engine.local_coordinator import BlobTracker, LocalCoordinator
from workers.engine.manifests import Descriptor
from workers.engine.protocols import Coordinator, ProgressFn
from workers.engine.ranges import MIN_LATENCY, RangeFetcher
from workers.engine.transport import RegistryTransport

if TYPE_CHECKING:
    from workers.engine.cache import BlobCache

log = logging.getLogger(__name__)

MAX_MOUNT_TRIES = 3

Action = Literal["skipped", "mounted", "copied"]


@dataclass(frozen=True)
class BlobResult:
    digest: str
    action: Action
    uploaded: int = 0
    downloaded: int = 0


class BlobCopier:
    """Copies blobs to destinations; one per engine, safe to use from many threads."""

    def __init__(
        self,
        transport: RegistryTransport,
        *,
        chunk_size: int = defaults.CHUNK_SIZE,
        cache: BlobCache | None = None,
        tracker: BlobTracker | None = None,
        coordinator: Coordinator | None = None,
        range_parallel: int = 0,
        range_threshold: int = defaults.RANGE_THRESHOLD,
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
                if blob_exists(self.transport, dst, desc.digest):
                    self._note(dst, desc.digest)
                    return BlobResult(desc.digest, "skipped")
                # One upload of a digest per registry in the whole cluster.
                with self.coordinator.upload_lease(host, desc.digest) as held:
                    # Whoever finished first recorded it before letting go of the lease.
                    found = self._known(src, dst, desc.digest, tried)
                    if found is not None:
                        return found
                    if not held and blob_exists(self.transport, dst, desc.digest):
                        self._note(dst, desc.digest)
                        return BlobResult(desc.digest, "skipped")
                    result = self._upload(src, dst, desc, progress, self.cache if use_cache else None)
                    self._note(dst, desc.digest)
                    if src.api_host == host:
                        self._note(src, desc.digest)
                    return result
        except RegistryError as exc:
            raise exc.with_reference(dst) from None

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
            if mount_blob(self.transport, dst, digest, repo):
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

    def _upload(self, src: Reference, dst: Reference, desc: Descriptor,
                progress: ProgressFn | None, cache: BlobCache | None) -> BlobResult:
        """Stream the bytes: from the node cache when it holds them, else from the source
        (in ranged parts when that helps), keeping a copy in the cache on the way."""
        with contextlib.ExitStack() as stack:
            cached = None
            if cache is not None:
                stack.enter_context(cache.lease(desc.digest))
                cached = cache.get(desc.digest)
            if cached is not None:
                reader = BlobReader(file_opener(cached), desc, None, remote=False)
            else:
                tee: CacheTee | None = None
                if cache is not None:
                    try:
                        tee = CacheTee(cache, desc)
                    except Exception as exc:
                        log.warning("blob cache unavailable for %s: %s", desc.digest, exc)
                opener = self.ranges.opener(src, desc.digest, desc.size,
                                            remote_opener(self.transport, src, desc.digest))
                reader = BlobReader(opener, desc, tee, remote=True)
            stack.callback(reader.close)
            try:
                uploaded = UploadSession(self.transport, dst, desc, reader, self.chunk_size, progress).run()
            except BaseException:
                if reader.tee is not None:
                    reader.tee.discard()
                raise
            if reader.tee is not None:
                reader.tee.commit()
            return BlobResult(desc.digest, "copied", uploaded=uploaded, downloaded=reader.downloaded)
