"""Helpers for tests of the docker engine."""

from __future__ import annotations

from config.jobs import SyncJob
from workers.engine.docker import DockerEngine
from workers.engine.docker_plan import plan_sync
from workers.engine.errors import RegistryError


def images_for(engine: DockerEngine, job: SyncJob) -> list[str]:
    """Every local reference a sync of ``job`` pulls or tags (what its cleanup should remove),
    from the engine's own plan: also for syncs that failed before reporting ``local_refs``."""
    try:
        return plan_sync(job, engine.default_platform).local_refs
    except (ValueError, RegistryError):
        return []
