"""The registry-to-registry engine: speaks the OCI Distribution API to both ends.

Registry failures become a ``failed`` SyncResult carrying the registry's error code
and whether trying later may help; only programming errors raise.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from config import defaults
from config.jobs import SyncJob, SyncResult
from config.platform import Platform
from config.reference import Reference, canonical_registry
from workers.engine.blobs import BlobCopier
from workers.engine.cache import BlobCache
from workers.engine.copy import CopyOutcome, copy_image
from workers.engine.errors import DigestMismatch, NotFound, RegistryError
from workers.engine.keychain import Keychain
from workers.engine.lanes import Lane
from workers.engine.plan import plan_copy
from workers.engine.protocols import CleanupStats, Coordinator, NoObserver, Observer, ProgressFn
from workers.engine.referrers import ReferrerCopier, carry_referrers
from workers.engine.results import sync_result
from workers.engine.retry import RetryPolicy
from workers.engine.tls import TlsConfig
from workers.engine.transport import DEFAULT_USER_AGENT, MAX_CONNECTIONS_PER_HOST, RegistryTransport

log = logging.getLogger(__name__)

# Warn in the result when Docker Hub's remaining pull quota falls below this share.
QUOTA_WARN_FRACTION = 0.1


@dataclass(frozen=True)
class RegistryOptions:
    insecure_registries: tuple[str, ...] = ()
    # Per registry host: CA bundle, client certificate, insecure (see workers/engine/tls.py).
    tls: Mapping[str, TlsConfig] = field(default_factory=dict)
    blob_concurrency: int = defaults.BLOB_CONCURRENCY
    # Images in flight at once on this engine (a thread pool's size; 1 per prefork process):
    # its thread pool and connection pools are sized for all of them.
    slots: int = 1
    chunk_size: int = defaults.CHUNK_SIZE
    retry_attempts: int = defaults.RETRY_ATTEMPTS
    retry_base_delay: float = defaults.RETRY_BASE_DELAY
    retry_max_delay: float = defaults.RETRY_MAX_DELAY
    connect_timeout: float = defaults.CONNECT_TIMEOUT
    read_timeout: float = defaults.READ_TIMEOUT
    user_agent: str = DEFAULT_USER_AGENT
    max_connections_per_host: int = MAX_CONNECTIONS_PER_HOST
    # Copy through the node cache when one is given; off, the cache is only cleaned up (it still
    # holds what earlier runs left).
    use_cache: bool = True
    # Keep blobs in the node cache even for one destination (retries and later batches hit it).
    cache_single_target: bool = False
    # Pull-through mirrors per source registry (``docker.io`` → ``["mirror:5000"]``): tried
    # first, in order; the origin when a mirror fails or lacks the image.
    mirrors: Mapping[str, list[str]] = field(default_factory=dict)
    # Pause a registry for the cluster when RateLimit-Remaining falls below this.
    quota_floor: int = defaults.QUOTA_FLOOR
    # Source blobs of at least range_threshold bytes come as this many Range requests at
    # once (0/1: one stream), for registries that cap each connection's throughput.
    range_parallel: int = defaults.RANGE_PARALLEL
    range_threshold: int = defaults.RANGE_THRESHOLD
    # Copy each image's signatures, attestations and SBOMs (a job can still opt out).
    referrers: bool = True


# What a pull-through mirror answers for content it does not hold (or holds damaged).
MIRROR_GAPS = (NotFound, DigestMismatch)


def _merge(earlier: CopyOutcome, retried: CopyOutcome) -> CopyOutcome:
    """``earlier`` with the destinations that ``retried`` went round again replaced by its results."""
    again = {d.destination for d in retried.destinations}
    return CopyOutcome(
        source_digest=earlier.source_digest or retried.source_digest,
        destinations=[d for d in earlier.destinations if d.destination not in again] + retried.destinations,
        failures={**{k: v for k, v in earlier.failures.items() if k not in again}, **retried.failures},
        bytes_downloaded=earlier.bytes_downloaded + retried.bytes_downloaded,
        bytes_uploaded=earlier.bytes_uploaded + retried.bytes_uploaded,
    )


class RegistryEngine:
    """Copies images registry to registry; one per worker process, shared by its threads."""

    name = "registry"

    def __init__(
        self,
        options: RegistryOptions | None = None,
        keychain: Keychain | None = None,
        cache: BlobCache | None = None,
        coordinator: Coordinator | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.options = options or RegistryOptions()
        o = self.options
        self.mirrors = {canonical_registry(k): list(v) for k, v in o.mirrors.items()}
        self.transport = RegistryTransport(
            keychain=keychain,
            insecure_registries=o.insecure_registries,
            tls=o.tls,
            retry=RetryPolicy(o.retry_attempts, o.retry_base_delay, o.retry_max_delay,
                              observer=observer or NoObserver()),
            connect_timeout=o.connect_timeout,
            read_timeout=o.read_timeout,
            user_agent=o.user_agent,
            # A warm image holds two at once (its manifest and its repository's tag list).
            max_connections=max(o.max_connections_per_host, 2 * o.slots),
            coordinator=coordinator,
            quota_floor=o.quota_floor,
            observer=observer,
        )
        self.cache = cache
        self.blobs = BlobCopier(self.transport, chunk_size=o.chunk_size, cache=cache if o.use_cache else None,
                                coordinator=coordinator,
                                range_parallel=o.range_parallel, range_threshold=o.range_threshold)
        # Threads start only when work waits for one, so a pool sized for every slot costs nothing idle.
        # Used only through lanes (``_lane``), which run each call in its submitter's context.
        self._executor = ThreadPoolExecutor(max_workers=o.blob_concurrency * o.slots, thread_name_prefix="ferry-blob")
        self.referrers = ReferrerCopier(self.transport, self.blobs)

    def sync(self, job: SyncJob, progress: ProgressFn, *, expect: ProgressFn | None = None) -> SyncResult:
        try:
            src = Reference.parse(job.source)
            dsts = [Reference.parse(d) for d in job.destinations]
            platforms = [Platform.parse(p) for p in job.platforms]
        except ValueError as exc:
            return sync_result(job, self.name, failures=[exc])
        try:
            if job.dry_run:
                outcome = plan_copy(self.transport, self._lane(), src, dsts, platforms=platforms)
            else:
                outcome = self._copy_via_mirrors(src, dsts, platforms, progress, expect,
                                                 referrers=self.options.referrers and job.referrers,
                                                 scope=job.batch_id)
        except RegistryError as exc:
            exc.with_reference(src)
            log.debug("sync of %s failed: %s", src, exc)  # the task layer logs the outcome once
            failed = sync_result(job, self.name, failures=[exc], warnings=self._warnings(src))
            # Blobs committed to the cache before the failure stay there until a cleanup.
            failed.used_disk = self._caches(len(dsts))
            return failed
        result = sync_result(job, self.name, failures=list(outcome.failures.values()),
                             destinations=outcome.destinations, source_digest=outcome.source_digest,
                             bytes_downloaded=outcome.bytes_downloaded, bytes_uploaded=outcome.bytes_uploaded,
                             warnings=self._warnings(src))
        if result.status != "up_to_date" and self._caches(len(dsts)):
            result.used_disk = True
        return result

    def _lane(self) -> Lane:
        """One image's share of the engine's pool: at most ``blob_concurrency`` of its calls at once."""
        return Lane(self._executor, self.options.blob_concurrency)

    def _caches(self, destinations: int) -> bool:
        """Whether a copy to this many destinations goes through the node cache (see copy_image)."""
        return self.cache is not None and self.options.use_cache and (
            self.options.cache_single_target or destinations > 1)

    def cleanup(self, remove: Sequence[str] = ()) -> CleanupStats:
        """Apply the cache policy; the registry engine leaves no local images to ``remove``."""
        return self.cache.cleanup() if self.cache is not None else CleanupStats()

    def sources(self, src: Reference) -> list[Reference]:
        """Where to read ``src`` from: its registry's mirrors first, then the registry."""
        mirrors = self.mirrors.get(canonical_registry(src.registry), [])
        return [*(src.with_name(m, src.repository) for m in mirrors), src]

    def _copy_via_mirrors(self, src: Reference, dsts: list[Reference], platforms: list[Platform],
                          progress: ProgressFn, expect: ProgressFn | None, *, referrers: bool,
                          scope: str | None = None) -> CopyOutcome:
        candidates = self.sources(src)
        merged: CopyOutcome | None = None
        pending = dsts
        for i, source in enumerate(candidates):
            last = i == len(candidates) - 1
            try:
                outcome = self._copy(source, pending, platforms, progress, expect, referrers=referrers, scope=scope)
            except RegistryError as exc:
                if last:
                    raise
                # Blobs already copied through the mirror are skipped on the way round.
                log.info("mirror %s failed for %s (%s); trying %s", source.registry, src, exc,
                         candidates[i + 1].registry)
                continue
            merged = outcome if merged is None else _merge(merged, outcome)
            # A mirror that lacks a blob fails only the destinations that needed it: those go round again.
            gaps = [d for d in pending if isinstance(outcome.failures.get(str(d)), MIRROR_GAPS)]
            if last or not gaps:
                return merged
            log.info("mirror %s lacks part of %s; trying %s", source.registry, src, candidates[i + 1].registry)
            pending = gaps
        raise AssertionError("unreachable")

    def _copy(self, src: Reference, dsts: list[Reference], platforms: list[Platform],
              progress: ProgressFn, expect: ProgressFn | None, *, referrers: bool,
              scope: str | None = None) -> CopyOutcome:
        lane = self._lane()
        if referrers and scope is not None:
            # The repository's tag list, which the referrer lookup reads after the copy, does not
            # depend on it: asked for now, it comes back during the copy instead of after.
            lane.submit(self.referrers.schema_tags, src, scope, ahead=True)
        outcome = copy_image(self.transport, self.blobs, lane, src, dsts,
                             platforms=platforms, progress=progress, expect=expect,
                             cache_single_target=self.options.cache_single_target)
        if referrers:
            carry_referrers(self.referrers, src, dsts, outcome, progress, expect,
                            use_cache=self._caches(len(dsts)), executor=lane, scope=scope)
        return outcome

    def _warnings(self, src: Reference) -> list[str]:
        quota = self.transport.quota(src.api_host)
        if quota is not None and quota.nearly_spent(QUOTA_WARN_FRACTION):
            return [f"{src.registry} pull quota nearly spent: {quota.remaining} of "
                    f"{quota.limit if quota.limit is not None else '?'} left"]
        return []

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.transport.close()
