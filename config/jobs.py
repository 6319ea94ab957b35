"""Task payloads and results exchanged through the broker (JSON, validated on both ends).

Payloads carry image references only; credentials are resolved on the worker.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from config.expansion import ExpandJob

# "would_copy": a dry run found the destination behind the source.
Status = Literal["synced", "up_to_date", "failed", "would_copy"]


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
    # Copy the image's signatures, attestations and SBOMs along with it.
    referrers: bool = True
    # Check with HEADs and manifest reads only; write nothing anywhere.
    dry_run: bool = False


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
    # Signatures, attestations and SBOMs pushed along with the image.
    referrers_copied: int = 0
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
    # Runs this task took (Celery retries included), and when the first of them started.
    attempts: int = 1
    first_started_at: float = 0.0
    # Images the docker engine left in its daemon; the chained cleanup removes them.
    local_refs: list[str] = Field(default_factory=list)
    # The registry engine copied through the node's blob cache: a cleanup follows (else none does).
    used_disk: bool = False
    cleanup_task_id: str | None = None

    @property
    def bytes_transferred(self) -> int:
        return sum(d.bytes_transferred for d in self.destinations)

    @property
    def ended_at(self) -> float:
        return self.started_at + self.duration_s

    @property
    def active_since(self) -> float:
        """When work on this image began: its first run, Celery's retry pauses included."""
        return self.first_started_at or self.started_at


class RequestRetry(BaseModel):
    """A request inside a running task that failed temporarily and is about to be sent again."""

    what: str
    # The failure just seen (1-based) of at most ``attempts - 1`` before the task's run gives up.
    failure: int
    attempts: int
    retry_at: float
    reason: str


class TaskState(BaseModel):
    """Where an unfinished sync task stands: running on a node (perhaps retrying a request), or
    waiting to run again."""

    phase: Literal["running", "retrying"]
    node: str = ""
    # The run under way or, while retrying, the next one (1-based), of at most ``attempts``.
    attempt: int = 1
    attempts: int = 1
    retry_at: float | None = None
    reason: str | None = None
    request: RequestRetry | None = None

    @property
    def retrying(self) -> bool:
        """Waiting for a run of the task, or for a request inside the run under way."""
        return self.phase == "retrying" or self.request is not None


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


class RetryRound(BaseModel):
    """One ``producer retry``: failed images sent again under new task ids."""

    started_at: float
    # New task id -> the failed task id it replaces (whose result moves to the batch's history).
    replaced: dict[str, str]


class BatchMeta(BaseModel):
    """Written by the producer before enqueueing; lets any machine report on a batch."""

    batch_id: str
    created_at: float
    list_file: str
    targets: list[str]
    jobs: list[SyncJob]
    # The current task of each job (same order); ``rounds`` say which replaced a failed one.
    task_ids: list[str]
    rounds: list[RetryRound] = Field(default_factory=list)
    # Selector lines, expanded on the workers; the sync jobs they add live beside the batch.
    expansions: list[ExpandJob] = Field(default_factory=list)
    expansion_ids: list[str] = Field(default_factory=list)
    dry_run: bool = False
    prune: bool = False

    def earlier_tasks(self, task_id: str) -> list[str]:
        """The failed tasks ``task_id`` was retried for, latest first."""
        chain: list[str] = []
        for rnd in reversed(self.rounds):
            if task_id in rnd.replaced:
                task_id = rnd.replaced[task_id]
                chain.append(task_id)
        return chain
