"""How every engine turns what happened into a ``SyncResult`` (timing, line and node are the
task layer's to stamp)."""

from __future__ import annotations

from collections.abc import Sequence

from config.jobs import DestinationResult, Status, SyncJob, SyncResult
from workers.engine.errors import RegistryError

# The code of a failure that is not a registry's: the job itself named something unusable.
INVALID_REFERENCE = "INVALID_REFERENCE"


def error_code(error: Exception) -> str:
    return error.code if isinstance(error, RegistryError) else INVALID_REFERENCE


def error_text(job: SyncJob, failures: Sequence[Exception], destinations: Sequence[DestinationResult]) -> str | None:
    """Each failed destination with its reason; a failure before any destination, as it reads
    next to the image."""
    failed = [f"{d.destination}: {d.error}" for d in destinations if d.status == "failed"]
    if failed:
        return "; ".join(failed)
    if failures:
        return "; ".join(f.reason(job.source) if isinstance(f, RegistryError) else str(f) for f in failures)
    return None


def is_temporary(failures: Sequence[Exception]) -> bool:
    """Retry the task only when every failure may pass: a permanent one will not heal by
    retrying, and the destinations that did succeed are skipped cheaply on the next run."""
    return bool(failures) and all(isinstance(f, RegistryError) and f.temporary for f in failures)


def sync_result(
    job: SyncJob,
    engine: str,
    *,
    failures: Sequence[Exception] = (),
    destinations: Sequence[DestinationResult] = (),
    source_digest: str | None = None,
    bytes_downloaded: int = 0,
    bytes_uploaded: int = 0,
    warnings: Sequence[str] = (),
    local_refs: Sequence[str] = (),
) -> SyncResult:
    """Failed when anything failed, up to date when every destination already was, else synced
    (or, in a dry run, would copy)."""
    status: Status
    if failures:
        status = "failed"
    elif destinations and all(d.status == "up_to_date" for d in destinations):
        status = "up_to_date"
    elif job.dry_run:
        status = "would_copy"  # a plan: nothing was written
    else:
        status = "synced"
    return SyncResult(
        batch_id=job.batch_id,
        source=job.source,
        engine=engine,
        status=status,
        source_digest=source_digest,
        destinations=list(destinations),
        bytes_downloaded=bytes_downloaded,
        bytes_uploaded=bytes_uploaded,
        error=error_text(job, failures, destinations),
        error_code=error_code(failures[0]) if failures else None,
        temporary=is_temporary(failures),
        warnings=list(warnings),
        local_refs=list(local_refs),
    )
