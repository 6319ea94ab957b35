"""Turn a validated list into one Celery task per image (and one per selector line), recorded as a batch."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

from config.expansion import ExpandJob
from config.jobs import BatchMeta, SyncJob
from config.settings import EngineName
from contract.batches import BatchStore
from contract.dispatch import expansion_id_for, publish, publish_expansions, task_id_for
from contract.wire import TaskPublisher
from producer.listfile import LineError, ListFileError, ParsedList, parse_list
from producer.mapping import Mapped, Target, map_destinations

__all__ = ["build_expansions", "build_jobs", "enqueue", "new_batch_id", "plan_batch", "publish",
           "task_id_for"]


def new_batch_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def build_jobs(batch_id: str, mapped: Sequence[Mapped], engine: EngineName, *, referrers: bool = True,
               dry_run: bool = False) -> list[SyncJob]:
    """One job per distinct copy of a plain line: lines that spell the same copy differently share
    one task id, and two jobs under one id would be counted twice in the report."""
    jobs: dict[tuple[str, tuple[str, ...], tuple[str, ...]], SyncJob] = {}
    for m in mapped:
        if m.entry.selector is not None:
            continue
        job = SyncJob(
            batch_id=batch_id,
            source=str(m.entry.source),
            destinations=[str(d) for d in m.destinations],
            platforms=[str(p) for p in m.entry.platforms],
            engine=engine,
            line=m.entry.line,
            referrers=referrers and m.entry.referrers,
            dry_run=dry_run,
        )
        jobs.setdefault((job.source, tuple(job.destinations), tuple(job.platforms)), job)
    return list(jobs.values())


def build_expansions(batch_id: str, mapped: Sequence[Mapped], engine: EngineName, *, referrers: bool = True,
                     dry_run: bool = False, prune: bool = False) -> list[ExpandJob]:
    """One expansion per selector line. With ``prune``, a destination repository may be filled by one
    selector line only (each line knows only what it selects); raises ListFileError otherwise."""
    fixed: dict[str, set[str]] = {}
    for m in mapped:
        if m.entry.selector is None:
            for d in m.destinations:
                if d.tag is not None:
                    fixed.setdefault(d.name, set()).add(d.tag)
    expansions: list[ExpandJob] = []
    filled_by: dict[str, Mapped] = {}
    errors: list[LineError] = []
    for m in mapped:
        selector = m.entry.selector
        if selector is None:
            continue
        repos = [d.name for d in m.destinations]
        for repo in repos:
            first = filled_by.setdefault(repo, m)
            if prune and first is not m:
                errors.append(LineError(m.entry.line, m.entry.text,
                                        f"with --prune each destination repository takes one selector line, and "
                                        f"{repo} is also filled by line {first.entry.line}; combine the two lines"))
        expansions.append(ExpandJob(
            batch_id=batch_id, source=m.entry.source.name, destinations=repos, selector=selector,
            platforms=[str(p) for p in m.entry.platforms], engine=engine, line=m.entry.line,
            referrers=referrers and m.entry.referrers, dry_run=dry_run, prune=prune,
            keep={r: sorted(fixed[r]) for r in repos if r in fixed}))
    if errors:
        raise ListFileError(errors)
    return expansions


def _parse(data: bytes, list_file: str) -> ParsedList:
    if not list_file.lower().endswith((".yaml", ".yml")):
        return parse_list(data)
    from producer.skopeo_yaml import parse_skopeo_yaml  # PyYAML loads only for the lists that need it

    return parse_skopeo_yaml(data)


def plan_batch(batch_id: str, data: bytes, targets: Sequence[str], *, flatten: bool, engine: EngineName,
               referrers: bool = True, list_file: str = "", dry_run: bool = False,
               prune: bool = False) -> tuple[list[SyncJob], list[ExpandJob], list[str]]:
    """A list's bytes to the jobs and selector-line expansions of one batch, and the list's warnings:
    the one path from a list to a batch, for ``producer enqueue`` and for scheduled runs alike. A
    ``list_file`` named ``*.yaml``/``*.yml`` is read as a skopeo sync YAML. Raises ListFileError
    naming every bad line, or InvalidReference for a bad target."""
    parsed = _parse(data, list_file)
    parsed_targets = [Target.parse(t) for t in targets]
    mapped = map_destinations(parsed.entries, parsed_targets, flatten=flatten)
    expansions = build_expansions(batch_id, mapped, engine, referrers=referrers, dry_run=dry_run, prune=prune)
    return build_jobs(batch_id, mapped, engine, referrers=referrers, dry_run=dry_run), expansions, parsed.warnings


def enqueue(publisher: TaskPublisher, store: BatchStore, batch_id: str, list_file: str, targets: list[str],
            jobs: list[SyncJob], expansions: Sequence[ExpandJob] = (), *, dry_run: bool = False,
            prune: bool = False) -> BatchMeta:
    """Record the batch, then publish every task over one broker connection."""
    task_ids = [task_id_for(batch_id, j) for j in jobs]
    expansion_ids = [expansion_id_for(batch_id, e) for e in expansions]
    meta = BatchMeta(batch_id=batch_id, created_at=time.time(), list_file=list_file, targets=targets,
                     jobs=jobs, task_ids=task_ids, expansions=list(expansions), expansion_ids=expansion_ids,
                     dry_run=dry_run, prune=prune)
    store.create(meta)
    # Expansions first: listing tags takes a while, and their syncs queue behind the listed images.
    publish_expansions(publisher, list(zip(expansion_ids, expansions, strict=True)))
    publish(publisher, list(zip(task_ids, jobs, strict=True)))
    return meta
