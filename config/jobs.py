"""Task payloads and results exchanged through the broker (JSON, validated on both ends).

Payloads carry image references only; credentials are resolved on the worker.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Status = Literal["synced", "up_to_date", "failed"]


class SyncJob(BaseModel):
    """One image: a source and every destination it is mirrored to."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch_id: str
    source: str
    destinations: list[str] = Field(min_length=1)
    # "os/arch[/variant]" strings; empty means every platform, index kept as is.
    platforms: list[str] = Field(default_factory=list)
    engine: Literal["registry", "docker"] = "registry"
    line: int = 0


class DestinationResult(BaseModel):
    destination: str
    status: Status
    digest: str | None = None
    # True when a platform filter made the pushed index differ from the source's.
    digest_changed: bool = False
    blobs_copied: int = 0
    blobs_mounted: int = 0
    blobs_skipped: int = 0
    bytes_transferred: int = 0
    error: str | None = None


class SyncResult(BaseModel):
    """What one sync task did; stored per batch for ``producer report``."""

    batch_id: str
    task_id: str = ""
    source: str
    source_digest: str | None = None
    status: Status
    destinations: list[DestinationResult] = Field(default_factory=list)
    node: str = ""
    engine: str = "registry"
    started_at: float = 0.0
    duration_s: float = 0.0
    bytes_downloaded: int = 0
    bytes_uploaded: int = 0
    error: str | None = None
    error_code: str | None = None
    temporary: bool = False
    warnings: list[str] = Field(default_factory=list)
    line: int = 0
    # Images the docker engine left in its daemon; the chained cleanup removes them.
    local_refs: list[str] = Field(default_factory=list)
    cleanup_task_id: str | None = None

    @property
    def bytes_transferred(self) -> int:
        return sum(d.bytes_transferred for d in self.destinations)


class CleanupResult(BaseModel):
    """What one cleanup run freed on its node."""

    node: str
    engine: str
    freed_bytes: int = 0
    freed_items: int = 0
    kept_bytes: int = 0
    kept_items: int = 0
    for_task: str | None = None
    errors: list[str] = Field(default_factory=list)


class BatchMeta(BaseModel):
    """Written by the producer before enqueueing; lets any machine report on a batch."""

    batch_id: str
    created_at: float
    list_file: str
    targets: list[str]
    jobs: list[SyncJob]
    task_ids: list[str]
