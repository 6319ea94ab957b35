"""Payloads and results of expansion tasks: a selector line becomes one sync job per selected tag.

The worker lists the source repository's tags, applies the selector and adds the sync jobs to the
same batch; with ``prune`` it also deletes destination tags the list no longer selects.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from config.selectors import TagSelector


class ExpandJob(BaseModel):
    """One selector line: a source repository and the repositories its tags go to."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch_id: str
    # ``registry/repository`` names, no tag.
    source: str
    destinations: list[str] = Field(min_length=1)
    selector: TagSelector
    platforms: list[str] = Field(default_factory=list)
    engine: Literal["registry", "docker"] = "registry"
    line: int = 0
    # Whether each selected image's signatures, attestations and SBOMs go along.
    referrers: bool = True
    dry_run: bool = False
    prune: bool = False
    # Per destination repository: tags that plain lines of the same list put there (never pruned).
    keep: dict[str, list[str]] = Field(default_factory=dict)


class PruneResult(BaseModel):
    """What pruning one destination repository did (or, in a dry run, would do)."""

    repository: str
    deleted: list[str] = Field(default_factory=list)
    would_delete: list[str] = Field(default_factory=list)
    # Tag -> why it is still there.
    failed: dict[str, str] = Field(default_factory=dict)
    # Why the repository was left alone, when it was.
    note: str | None = None


class ExpandResult(BaseModel):
    batch_id: str
    task_id: str = ""
    source: str
    line: int = 0
    status: Literal["expanded", "failed"]
    listed: int = 0
    selected: list[str] = Field(default_factory=list)
    # Sync tasks this expansion put in the batch (selected tags another line already covers are not).
    added: int = 0
    pruned: list[PruneResult] = Field(default_factory=list)
    error: str | None = None
    error_code: str | None = None
    temporary: bool = False
    node: str = ""
    duration_s: float = 0.0
