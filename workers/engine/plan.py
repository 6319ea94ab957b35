"""Dry runs: what a copy would do, found with HEADs and manifest reads, writing nothing.

Per destination: up to date (digests agree), would copy (the blobs the destination lacks and
their bytes), or the error a copy would meet. Up-to-date images cost one HEAD per side; others
also read their manifests (which Docker Hub counts as pulls) and HEAD each blob at the destination.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from itertools import repeat

from config.jobs import DestinationResult
from config.platform import Platform
from config.reference import Reference
from workers.engine.blob_endpoints import blob_exists
from workers.engine.copy import CopyOutcome, behind, plan_image, record_failure, select_platforms
from workers.engine.errors import RegistryError
from workers.engine.manifests import get_manifest, head_manifest, missing_manifest
from workers.engine.transport import RegistryTransport


def plan_copy(transport: RegistryTransport, executor: Executor, src: Reference, destinations: Sequence[Reference],
              *, platforms: Sequence[Platform] = ()) -> CopyOutcome:
    """The outcome a copy would have; source failures raise, as for a copy."""
    src_future = executor.submit(head_manifest, transport, src)
    dst_futures = [executor.submit(head_manifest, transport, d) for d in destinations]
    head = src_future.result()
    if head is None:
        raise missing_manifest(transport, src)
    outcome = CopyOutcome(source_digest=head.digest)
    pinned = src.with_digest(head.digest)
    root = None
    if platforms:
        manifest = head.manifest or get_manifest(transport, pinned)
        root = select_platforms(transport, pinned, manifest, platforms) if manifest.is_index else manifest
    target = root.digest if root is not None else head.digest
    pending = behind(outcome, destinations, dst_futures, target)
    if not pending:
        return outcome
    plan = plan_image(transport, pinned, root or head.manifest or get_manifest(transport, pinned), executor)
    for dst in pending:
        try:
            present = list(executor.map(blob_exists, repeat(transport), repeat(dst), [b.digest for b in plan.blobs]))
        except RegistryError as exc:
            record_failure(outcome, dst, exc)
            continue
        missing = [b for b, there in zip(plan.blobs, present, strict=True) if not there]
        outcome.destinations.append(DestinationResult(
            destination=str(dst), status="would_copy", digest=target, digest_changed=target != head.digest,
            blobs_copied=len(missing), blobs_skipped=len(plan.blobs) - len(missing),
            bytes_transferred=sum(b.size for b in missing)))
    order = {str(d): i for i, d in enumerate(destinations)}
    outcome.destinations.sort(key=lambda r: order.get(r.destination, len(order)))
    return outcome
