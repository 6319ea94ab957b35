"""What a docker-engine sync pulls, tags and pushes, worked out before the daemon is asked anything."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from config.jobs import SyncJob
from config.platform import Platform
from config.reference import Reference
from workers.engine.errors import InvalidRequest


def platform_tag(tag: str, platform: Platform) -> str:
    """``v1`` + ``linux/arm64/v8`` -> ``v1-linux-arm64-v8`` (tags allow at most 128 characters)."""
    parts = [tag, platform.os, platform.architecture] + ([platform.variant] if platform.variant else [])
    return "-".join(parts)[:128]


@dataclass(frozen=True)
class Target:
    """One tag pushed for one platform."""

    destination: Reference  # as given in the job
    name: str  # registry/repository
    tag: str

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"


@dataclass(frozen=True)
class Plan:
    source: Reference
    pull_ref: str  # what the daemon names the pulled image
    platforms: tuple[Platform, ...]
    explicit: bool  # platforms came from the job, not the default
    targets: Mapping[Platform, tuple[Target, ...]]

    @property
    def local_refs(self) -> list[str]:
        """Every local name the sync gives an image: what its cleanup removes."""
        refs = [self.pull_ref]
        for ts in self.targets.values():
            refs += [t.ref for t in ts]
        return list(dict.fromkeys(refs))


def plan_sync(job: SyncJob, default_platform: Platform) -> Plan:
    """What a sync of ``job`` pulls and pushes: the daemon holds one platform per image, so several
    platforms become one tag per platform."""
    src = Reference.parse(job.source)
    explicit = bool(job.platforms)
    platforms = tuple(dict.fromkeys(Platform.parse(p) for p in job.platforms)) or (default_platform,)
    pull_ref = f"{src.name}@{src.digest}" if src.digest else f"{src.name}:{src.tag}"
    targets: dict[Platform, tuple[Target, ...]] = {}
    dsts = [Reference.parse(d) for d in job.destinations]
    for p in platforms:
        ts = []
        for d in dsts:
            tag = d.tag or (src.tag if d.digest is None else None)
            if tag is None:
                raise InvalidRequest(
                    f"cannot push to {d}: the docker engine pushes tags, give the destination a tag"
                )
            if len(platforms) > 1:
                tag = platform_tag(tag, p)
            ts.append(Target(d, d.name, tag))
        targets[p] = tuple(ts)
    return Plan(src, pull_ref, platforms, explicit, targets)
