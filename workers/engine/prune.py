"""Deleting the tags of a destination repository that the list no longer selects.

A tag is deleted by ``DELETE .../manifests/<tag>`` where the registry supports it. Registries
that delete manifests only by digest (distribution 2.x answers 400 to a tag) get the digest, but
only when no tag that stays — and no index that stays — points at that manifest: deleting it
would take the kept tag with it. Selected tags still being copied are not at the destination yet,
so the digests they will have (``incoming``, read from the source) are protected too. Referrer and
signature tags are never touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from config.expansion import PruneResult
from config.reference import Reference
from config.selectors import is_referrer_tag
from workers.engine.errors import NotFound, RegistryError
from workers.engine.manifests import INDEX_TYPES, ManifestHead, get_manifest, head_manifest
from workers.engine.tags import delete_manifest, list_tags
from workers.engine.transport import RegistryTransport

REFUSED = ("the registry refuses deletes ({why}); allow them for the credentials ferry uses "
           "(docker-registry: storage.delete.enabled: true in its config)")


def prune_repository(transport: RegistryTransport, repo: Reference, keep: Iterable[str], *, dry_run: bool,
                     page_size: int, incoming: Callable[[], set[str]] = set) -> PruneResult:
    """Delete (or, with ``dry_run``, list) the tags of ``repo`` outside ``keep``."""
    result = PruneResult(repository=repo.name)
    try:
        tags = list_tags(transport, repo, page_size=page_size)
    except NotFound:
        return result  # nothing mirrored there yet
    kept = set(keep)
    doomed = [t for t in tags if t not in kept and not is_referrer_tag(t)]
    if dry_run:
        result.would_delete = doomed
        return result
    by_digest: list[str] = []
    for tag in doomed:
        try:
            delete_manifest(transport, repo, tag)
        except RegistryError as exc:
            if exc.status in (400, 405):
                # distribution 2.x answers 400 DIGEST_INVALID to a tag: it may take the digest instead.
                by_digest.append(tag)
            else:
                result.failed[tag] = _reason(exc)
            continue
        result.deleted.append(tag)
    if by_digest:
        _delete_by_digest(transport, repo, tags, by_digest, result, incoming())
    return result


def incoming_digests(transport: RegistryTransport, source: Reference, tags: Iterable[str], *,
                     children: bool) -> set[str]:
    """The manifests ``tags`` of ``source`` will put at a destination (HEADs; with ``children``, the
    children of indexes too, for platform-filtered copies, which push a child under the tag)."""
    found: set[str] = set()
    for tag in tags:
        head = head_manifest(transport, source.with_tag(tag))
        if head is None:
            continue
        found.add(head.digest)
        if children and head.media_type in INDEX_TYPES:
            found.update(c.digest for c in get_manifest(transport, source, head.digest).children)
    return found


def _delete_by_digest(transport: RegistryTransport, repo: Reference, tags: list[str], doomed: list[str],
                      result: PruneResult, incoming: set[str]) -> None:
    heads: dict[str, ManifestHead] = {}
    for tag in tags:
        head = head_manifest(transport, repo.with_tag(tag))
        if head is not None:
            heads[tag] = head
    going = set(doomed)
    # Manifests that stay: those of kept tags and, for kept indexes, their children.
    staying: dict[str, str] = dict.fromkeys(incoming, "a selected tag being copied")
    for tag, head in heads.items():
        if tag in going:
            continue
        staying.setdefault(head.digest, tag)
        if head.media_type in INDEX_TYPES:
            for child in get_manifest(transport, repo, head.digest).children:
                staying.setdefault(child.digest, tag)
    for tag in doomed:
        if tag in result.deleted or tag in result.failed:
            continue
        head = heads.get(tag)
        if head is None:
            result.deleted.append(tag)  # gone meanwhile
            continue
        holder = staying.get(head.digest)
        if holder is not None:
            result.failed[tag] = (f"shares its manifest with {holder}, which stays; this registry deletes "
                                  "manifests, not tags, so the tag cannot go alone")
            continue
        with_it = [t for t in doomed if t in heads and heads[t].digest == head.digest]
        try:
            delete_manifest(transport, repo, head.digest)
        except RegistryError as exc:
            for t in with_it:
                result.failed[t] = _reason(exc)
            continue
        result.deleted.extend(with_it)


def _reason(exc: RegistryError) -> str:
    why = f"HTTP {exc.status} {exc.code}: {exc.message}"
    if exc.status == 405 or "UNSUPPORTED" in exc.codes:
        return REFUSED.format(why=why)
    if exc.status in (401, 403):
        return f"not allowed to delete ({why}); the credentials need delete rights"
    return str(exc)
