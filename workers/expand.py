"""Expanding a selector line on a worker: list the source repository's tags, keep those the selector
selects, add one sync job per tag to the same batch, and prune the destinations when asked.

Listing runs here, not in the producer, because the credentials live on the workers, and through
the engine's transport, so the cluster's per-registry limits and quota pauses hold for it too.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence

from config.expansion import ExpandJob, ExpandResult, PruneResult
from config.jobs import SyncJob
from config.reference import Reference, tag_problem
from contract.batches import BatchStore
from contract.dispatch import task_id_for
from workers.engine.errors import RegistryError
from workers.engine.prune import incoming_digests, prune_repository
from workers.engine.registry import RegistryEngine
from workers.engine.tags import list_tags

log = logging.getLogger("ferry.expand")

Publish = Callable[[Sequence[tuple[str, SyncJob]]], None]


def expand(job: ExpandJob, task_id: str, engine: RegistryEngine, store: BatchStore, publish: Publish, *,
           page_size: int) -> ExpandResult:
    """Never raises for registry trouble: a failed listing is a ``failed`` result saying why."""
    t0 = time.monotonic()
    result = ExpandResult(batch_id=job.batch_id, task_id=task_id, source=job.source, line=job.line, status="failed")
    src = Reference.parse(job.source)
    try:
        tags = list_tags(engine.transport, src, page_size=page_size)
    except RegistryError as exc:
        exc.with_reference(job.source)
        log.info("listing tags of %s failed: %s", job.source, exc)
        return result.model_copy(update={"error": exc.reason(src), "error_code": exc.code,
                                         "temporary": exc.temporary, "duration_s": time.monotonic() - t0})
    # A registry could list a name no reference can carry; such a tag cannot be copied by name.
    selected = [t for t in job.selector.select(tags) if tag_problem(t) is None]
    meta = store.meta(job.batch_id)
    listed = set(meta.task_ids) if meta is not None else set()
    jobs = [(tid, j) for j in (_sync_job(job, tag) for tag in selected)
            if (tid := task_id_for(job.batch_id, j)) not in listed]
    mine = store.add_jobs(job.batch_id, jobs)
    publish(mine)
    log.info("%s: %d tags, %d selected, %d tasks added", job.source, len(tags), len(selected), len(mine))
    # Read from the source only if a registry that deletes by digest needs them, and then once.
    incoming = functools.cache(lambda: incoming_digests(engine.transport, src, selected,
                                                        children=bool(job.platforms)))
    pruned = [_prune(engine, job, repo, selected, page_size, incoming) for repo in job.destinations] \
        if job.prune else []
    return result.model_copy(update={"status": "expanded", "listed": len(tags), "selected": selected,
                                     "added": len(mine), "pruned": pruned, "duration_s": time.monotonic() - t0})


def _sync_job(job: ExpandJob, tag: str) -> SyncJob:
    return SyncJob(batch_id=job.batch_id, source=str(Reference.parse(job.source).with_tag(tag)),
                   destinations=[str(Reference.parse(d).with_tag(tag)) for d in job.destinations],
                   platforms=job.platforms, engine=job.engine, line=job.line, referrers=job.referrers,
                   dry_run=job.dry_run)


def _prune(engine: RegistryEngine, job: ExpandJob, repo: str, selected: list[str], page_size: int,
           incoming: Callable[[], set[str]]) -> PruneResult:
    if not selected:
        # A selector that matches nothing (a typo, an empty source) must not empty the mirror.
        return PruneResult(repository=repo, note="nothing selected, so nothing pruned")
    keep = {*selected, *job.keep.get(repo, [])}
    try:
        return prune_repository(engine.transport, Reference.parse(repo), keep, dry_run=job.dry_run,
                                page_size=page_size, incoming=incoming)
    except RegistryError as exc:
        return PruneResult(repository=repo, note=f"not pruned: {exc}")
