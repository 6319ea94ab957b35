"""Every Redis key the cluster coordination uses, in one place (all under ``ferry:coord:``)."""

from __future__ import annotations

PREFIX = "ferry:coord"


def ledger(registry: str, digest: str) -> str:
    """Sorted set: repository -> when it was last seen holding ``digest`` (ms)."""
    return f"{PREFIX}:ledger:{registry}:{digest}"


def blob_lease(registry: str, digest: str) -> str:
    return f"{PREFIX}:lease:blob:{registry}:{digest}"


def manifest_lease(registry: str, repository: str, reference: str) -> str:
    return f"{PREFIX}:lease:manifest:{registry}/{repository}:{reference}"


def done(lease_key: str) -> str:
    """Set when the holder of ``lease_key`` finished successfully; waiters then skip the work."""
    return f"{lease_key}:done"


def bucket(registry: str) -> str:
    """Hash: the request token bucket of a registry (tokens, last refill in ms)."""
    return f"{PREFIX}:bucket:{registry}"


def slots(registry: str) -> str:
    """Sorted set: request slot id -> expiry (ms) — requests in flight to a registry."""
    return f"{PREFIX}:slots:{registry}"


def pause(registry: str, credential: int) -> str:
    """Epoch ms until which no request may go to ``registry`` with that credential."""
    return f"{PREFIX}:pause:{registry}:{credential}"


def credential(registry: str) -> str:
    """Index of the credential every worker uses for ``registry`` right now."""
    return f"{PREFIX}:credential:{registry}"
