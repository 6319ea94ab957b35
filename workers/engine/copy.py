"""Copying one image (a manifest, or an index and everything under it) to destinations.

Cheapest first: HEAD the source and each destination (HEADs do not count against
Docker Hub's pull quota) and stop when the digests agree. Otherwise fetch the
manifest tree by digest, copy the blobs with bounded concurrency, push child
manifests before their parents and the tag last, so a destination never shows a
tag whose content is incomplete.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Executor, Future, wait
from dataclasses import dataclass, field

from config.jobs import DestinationResult
from config.platform import Platform
from config.reference import Reference
from workers.engine.blobs import BlobCopier, BlobResult
from workers.engine.errors import ManifestError, NotFound, RegistryError
from workers.engine.manifests import (
    INDEX_TYPES,
    Descriptor,
    Manifest,
    ManifestHead,
    get_manifest,
    head_manifest,
    missing_manifest,
    parse_manifest,
    put_manifest,
    sha256_digest,
)
from workers.engine.protocols import ProgressFn
from workers.engine.transport import RegistryTransport

log = logging.getLogger(__name__)

# What a registry answers when a pushed manifest names a blob it does not have.
BLOB_UNKNOWN_CODES = frozenset({"MANIFEST_BLOB_UNKNOWN", "BLOB_UNKNOWN"})
# Indexes of indexes exist (nested artifacts); deeper trees are not images.
MAX_DEPTH = 4
# buildx attestations point at the image they describe with this annotation.
_REFERENCE_ANNOTATION = "vnd.docker.reference.digest"


@dataclass
class ImagePlan:
    """What to push: manifests children-first, the root last, and every blob they need."""

    root: Manifest
    manifests: list[Manifest]
    blobs: list[Descriptor]
    digest_changed: bool


@dataclass
class CopyOutcome:
    source_digest: str | None
    destinations: list[DestinationResult] = field(default_factory=list)
    # Per destination (its string form): the error that failed it.
    failures: dict[str, RegistryError] = field(default_factory=dict)
    bytes_downloaded: int = 0
    bytes_uploaded: int = 0
    # The source manifest's media type, and the root pushed when it was fetched: what the
    # referrers step needs to find the digests whose signatures go along.
    source_media_type: str = ""
    root: Manifest | None = None
    # The root is an index built here (a platform filter kept some children), not the source's.
    root_built: bool = False


def _platform_text(p: object) -> str:
    if not isinstance(p, dict):
        return "unknown"
    text = f"{p.get('os', '?')}/{p.get('architecture', '?')}"
    return text + (f"/{p['variant']}" if p.get("variant") else "")


@dataclass
class _Matches:
    """Index entries a platform filter keeps, gathered through nested indexes."""

    entries: dict[str, dict[str, object]] = field(default_factory=dict)  # digest -> index entry
    images: list[Descriptor] = field(default_factory=list)  # the platform matches themselves
    available: set[str] = field(default_factory=set)
    nested: bool = False  # some match sits inside a child index


def _gather(transport: RegistryTransport, src: Reference, index: Manifest, platforms: Sequence[Platform],
            found: _Matches, depth: int) -> None:
    """Add ``index``'s matching entries (and their attestations) to ``found``; look inside child
    indexes that carry no platform of their own, ``MAX_DEPTH`` levels at most."""
    entries = index.doc.get("manifests", [])
    keep = [c for c in index.children if c.platform and any(p.matches(c.platform) for p in platforms)]
    kept = {c.digest for c in keep}
    found.images += [c for c in keep if c.digest not in found.entries]
    for e, c in zip(entries, index.children, strict=True):
        if c.platform:
            found.available.add(_platform_text(c.platform))
        if c.digest in kept or (e.get("annotations") or {}).get(_REFERENCE_ANNOTATION) in kept:
            found.entries.setdefault(c.digest, e)
        elif c.platform is None and c.media_type in INDEX_TYPES:
            if depth + 2 > MAX_DEPTH:  # its entries would lie deeper than plan_image follows
                raise ManifestError(f"indexes nested deeper than {MAX_DEPTH} levels", reference=str(src))
            before = len(found.entries)
            _gather(transport, src, get_manifest(transport, src, c.digest), platforms, found, depth + 1)
            found.nested = found.nested or len(found.entries) > before


def select_platforms(
    transport: RegistryTransport, src: Reference, index: Manifest, platforms: Sequence[Platform]
) -> Manifest:
    """The root to push for a platform filter: the index itself when every entry matches,
    the one matching manifest, or an index of the matching ones (and their attestations),
    found in the index or in the indexes nested in it."""
    found = _Matches()
    _gather(transport, src, index, platforms, found, 0)
    if not found.images:
        available = ", ".join(sorted(found.available)) or "no platforms"
        wanted = ", ".join(str(p) for p in platforms)
        raise NotFound(f"no manifest for platform {wanted} (the index has: {available})",
                       reference=str(src))
    if not found.nested and len(found.entries) == len(index.children):
        return index
    if len(found.images) == 1:
        return get_manifest(transport, src, found.images[0].digest)
    doc = dict(index.doc)
    doc["manifests"] = list(found.entries.values())
    # Deterministic bytes, so the next sync finds the same digest and skips.
    raw = json.dumps(doc, indent=3).encode()
    return parse_manifest(raw, content_type=index.media_type, digest=sha256_digest(raw))


def plan_image(transport: RegistryTransport, src: Reference, root: Manifest,
               executor: Executor | None = None) -> ImagePlan:
    """Fetch every manifest under ``root`` and list the blobs (each once).

    The root's children are fetched concurrently on ``executor`` (one round trip for a
    whole multi-arch index instead of one per platform); deeper levels are rare.
    """
    ordered: list[Manifest] = []
    blobs: dict[str, Descriptor] = {}
    seen: set[str] = set()

    def walk(m: Manifest, depth: int, fetched: dict[str, Manifest]) -> None:
        if depth > MAX_DEPTH:
            raise ManifestError(f"indexes nested deeper than {MAX_DEPTH} levels", reference=str(src))
        for child in m.children:
            if child.digest in seen:
                continue
            seen.add(child.digest)
            sub = fetched.get(child.digest) or get_manifest(transport, src, child.digest)
            walk(sub, depth + 1, {})
        for b in m.blobs():
            blobs.setdefault(b.digest, b)
        ordered.append(m)

    prefetched: dict[str, Manifest] = {}
    wanted = list(dict.fromkeys(c.digest for c in root.children))
    if executor is not None and len(wanted) > 1:
        got = executor.map(lambda d: get_manifest(transport, src, d), wanted)
        prefetched = {m.digest: m for m in got}
    walk(root, 0, prefetched)
    return ImagePlan(root, ordered, list(blobs.values()), digest_changed=False)


def copy_image(
    transport: RegistryTransport,
    copier: BlobCopier,
    executor: Executor,
    src: Reference,
    destinations: Sequence[Reference],
    *,
    platforms: Sequence[Platform] = (),
    progress: ProgressFn | None = None,
    expect: ProgressFn | None = None,
    cache_single_target: bool = False,
) -> CopyOutcome:
    """Copy ``src`` to every destination. Source failures raise; a destination's failure
    is recorded in the outcome and the other destinations still get their copy.

    The node cache is used when several destinations want the blobs (one download serves
    them all), or always with ``cache_single_target``.
    """
    # The source lookup and the destinations' HEADs are independent: one round trip for all.
    dst_futures = [executor.submit(head_manifest, transport, d) for d in destinations]
    head = _lookup_source(transport, src)
    source_digest, fetched = head.digest, head.manifest
    outcome = CopyOutcome(source_digest=source_digest, source_media_type=head.media_type, root=fetched)
    src_pinned = src.with_digest(source_digest)

    plan: ImagePlan | None = None
    if platforms:
        # The pushed digest depends on the filter, so the manifest is needed to compare.
        manifest = fetched or get_manifest(transport, src_pinned)
        root = select_platforms(transport, src_pinned, manifest, platforms) if manifest.is_index else manifest
        plan = plan_image(transport, src_pinned, root, executor)
        plan.digest_changed = root.digest != source_digest
        outcome.root, outcome.root_built = root, root.is_index and plan.digest_changed
        target = root.digest
    else:
        target = source_digest

    pending = behind(outcome, destinations, dst_futures, target)
    if not pending:
        return outcome
    if plan is None:
        plan = plan_image(transport, src_pinned, fetched or get_manifest(transport, src_pinned), executor)
        outcome.root = plan.root

    for dst in pending:
        try:
            result, downloaded = copy_plan(transport, copier, executor, src_pinned, dst, plan, progress, expect,
                                           use_cache=cache_single_target or len(pending) > 1)
        except RegistryError as exc:
            record_failure(outcome, dst, exc)
            continue
        outcome.destinations.append(result)
        outcome.bytes_uploaded += result.bytes_transferred
        outcome.bytes_downloaded += downloaded
    # Report in the order the destinations were given.
    order = {str(d): i for i, d in enumerate(destinations)}
    outcome.destinations.sort(key=lambda r: order.get(r.destination, len(order)))
    return outcome


def behind(outcome: CopyOutcome, destinations: Sequence[Reference],
           heads: Sequence[Future[ManifestHead | None]], target: str) -> list[Reference]:
    """The destinations whose HEAD did not find ``target``; the others go into ``outcome`` as up to
    date, or failed when their HEAD failed."""
    pending: list[Reference] = []
    for dst, head in zip(destinations, heads, strict=True):
        try:
            dhead = head.result()
        except RegistryError as exc:
            record_failure(outcome, dst, exc)
            continue
        if dhead is not None and dhead.digest == target:
            outcome.destinations.append(DestinationResult(
                destination=str(dst), status="up_to_date", digest=target,
                digest_changed=target != outcome.source_digest))
        else:
            pending.append(dst)
    return pending


def _lookup_source(transport: RegistryTransport, src: Reference) -> ManifestHead:
    """The source's digest, with its manifest where that costs nothing more: a GET brings both in
    one round trip, and the manifest is needed whenever a destination lacks the image. Where manifest
    GETs are metered (Docker Hub), a HEAD: it is free there, and most images of a mirror are up to date."""
    if transport.meters_pulls(src.api_host):
        return _resolve_source(transport, src)
    try:
        m = get_manifest(transport, src)
    except NotFound:
        raise missing_manifest(transport, src) from None
    return ManifestHead(m.digest, m.media_type, len(m.raw), manifest=m)


def _resolve_source(transport: RegistryTransport, src: Reference) -> ManifestHead:
    """The source's digest by HEAD (free of Docker Hub's pull quota), or by GET where a
    registry sends no digest header — then the fetched manifest is kept for reuse."""
    head = head_manifest(transport, src)
    if head is None:
        raise missing_manifest(transport, src)
    return head


def record_failure(outcome: CopyOutcome, dst: Reference, exc: RegistryError) -> None:
    exc.with_reference(dst)
    outcome.failures[str(dst)] = exc
    outcome.destinations.append(DestinationResult(destination=str(dst), status="failed", error=exc.reason(dst)))


def copy_plan(
    transport: RegistryTransport,
    copier: BlobCopier,
    executor: Executor,
    src: Reference,
    dst: Reference,
    plan: ImagePlan,
    progress: ProgressFn | None,
    expect: ProgressFn | None,
    *,
    use_cache: bool,
) -> tuple[DestinationResult, int]:
    """Push the plan to one destination; returns its result and the bytes read from the source."""
    results = _copy_blobs(copier, executor, src, dst, plan.blobs, progress, expect, use_cache)
    try:
        _push_manifests(transport, copier, src, dst, plan)
    except RegistryError as exc:
        if not BLOB_UNKNOWN_CODES.intersection(exc.codes):
            raise
        # A blob skipped on the ledger's word was garbage-collected since: forget what was
        # skipped, copy again (HEAD decides now), push once more.
        log.info("%s: destination lacks a blob the ledger listed; copying again", dst)
        for r in results:
            if r.action == "skipped":
                copier.forget(dst, r.digest)
        results = _copy_blobs(copier, executor, src, dst, plan.blobs, progress, expect, use_cache)
        _push_manifests(transport, copier, src, dst, plan)
    root = plan.root
    return DestinationResult(
        destination=str(dst),
        status="synced",
        digest=root.digest,
        digest_changed=plan.digest_changed,
        blobs_copied=sum(r.action == "copied" for r in results),
        blobs_mounted=sum(r.action == "mounted" for r in results),
        blobs_skipped=sum(r.action == "skipped" for r in results),
        bytes_transferred=sum(r.uploaded for r in results),
    ), sum(r.downloaded for r in results)


def _push_manifests(transport: RegistryTransport, copier: BlobCopier, src: Reference, dst: Reference,
                    plan: ImagePlan) -> None:
    """Children by digest, then the root under the tag (or its digest)."""
    root = plan.root
    tag = dst.tag if dst.tag is not None else (None if dst.digest else src.tag)
    # Two tasks writing one tag take turns; the second skips if the first wrote the same.
    with copier.coordinator.manifest_lease(dst.api_host, dst.repository, tag or root.digest) as held:
        current = None if held else head_manifest(transport, dst.with_tag(tag) if tag else dst)
        if current is None or current.digest != root.digest:
            for m in plan.manifests:
                if m is not root:
                    put_manifest(transport, dst, m.digest, m)
            put_manifest(transport, dst, tag or root.digest, root)


def _copy_blobs(
    copier: BlobCopier,
    executor: Executor,
    src: Reference,
    dst: Reference,
    blobs: Sequence[Descriptor],
    progress: ProgressFn | None,
    expect: ProgressFn | None,
    use_cache: bool,
) -> list[BlobResult]:
    """All blobs, ``executor``-many at once; the first failure cancels what has not started.

    ``expect`` hears every blob's size up front, and the size back of each one that turned out
    to be there already (skipped or mounted): what is left is what will move."""
    stop = threading.Event()
    if expect is not None:
        expect(sum(d.size for d in blobs))

    def one(desc: Descriptor) -> BlobResult:
        if stop.is_set():
            raise RegistryError("cancelled after another blob failed")
        result = copier.copy(src, dst, desc, progress, use_cache=use_cache)
        if expect is not None and result.action != "copied":
            expect(-desc.size)
        return result

    futures: list[Future[BlobResult]] = [executor.submit(one, d) for d in blobs]
    done, _ = wait(futures, return_when=FIRST_EXCEPTION)
    failed = next((f for f in done if f.exception() is not None), None)
    if failed is not None:
        stop.set()
        for f in futures:
            f.cancel()
        wait(futures)
        exc = failed.exception()
        assert exc is not None
        raise exc
    return [f.result() for f in futures]
