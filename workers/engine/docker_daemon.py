"""Speaking to a Docker daemon: its error text typed, the ``X-Registry-Auth`` document, pull and
push progress streams tallied, secrets scrubbed from what it says, old images pruned."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import docker
import docker.errors

from config.reference import DOCKER_HUB, Reference
from workers.engine.errors import (
    Denied,
    InvalidRequest,
    NotFound,
    RateLimited,
    RegistryError,
    ServerError,
    TransportError,
    Unauthorized,
    missing,
)
from workers.engine.keychain import DOCKER_HUB_SERVER_URL, Credential
from workers.engine.protocols import ProgressFn

# Message fragments from dockerd (which wraps registry errors in its own text), most specific first.
_CLASSIFIERS: tuple[tuple[re.Pattern[str], type[RegistryError]], ...] = tuple(
    (re.compile(p, re.IGNORECASE), cls)
    for p, cls in (
        (r"toomanyrequests|too many requests|rate limit", RateLimited),
        (r"no matching manifest|manifest unknown|name unknown|not found|does not exist|no such image", NotFound),
        (r"denied|forbidden", Denied),
        (
            r"unauthorized|authentication required|no basic auth credentials|incorrect username or password",
            Unauthorized,
        ),
        (r"invalid reference format|invalid tag format|repository name must", InvalidRequest),
        (
            r"connection refused|connection reset|i/o timeout|timeout|timed out|\beof\b|broken pipe"
            r"|no route to host|network is unreachable|tls handshake|dial tcp|server misbehaving",
            TransportError,
        ),
        (r"\b5\d\d\b|internal server error|bad gateway|service unavailable", ServerError),
    )
)


def classify(message: str, *, status: int | None = None, reference: str | None = None) -> RegistryError:
    """The typed error for something dockerd reported, by its text (it has no error codes)."""
    for pattern, cls in _CLASSIFIERS:
        if pattern.search(message):
            return cls(message, status=status, reference=reference)
    if status is not None and 400 <= status < 500:
        return InvalidRequest(message, status=status, reference=reference)
    # Unknown daemon failures are usually transient (disk, containerd hiccups); the retry budget bounds them.
    return RegistryError(message, status=status, reference=reference, temporary=True)


def what_is_missing(e: RegistryError, src: Reference) -> RegistryError:
    """dockerd's "manifest unknown" / "name unknown", said as the registry engine says them."""
    if not isinstance(e, NotFound):
        return e
    text = e.message.lower()
    if "name unknown" in text or "repository name not known" in text:
        return missing(src, repository=False)
    if "manifest unknown" in text:
        return missing(src, repository=None)  # dockerd asks by HEAD, whose 404 does not say which
    return e


def auth_config(registry: str, cred: Credential | None) -> dict[str, str] | None:
    """The ``X-Registry-Auth`` document for one call; never logged."""
    if cred is None:
        return None
    server = DOCKER_HUB_SERVER_URL if registry == DOCKER_HUB else registry
    cfg = {"serveraddress": server}
    if cred.registry_token:
        cfg["registrytoken"] = cred.registry_token
    elif cred.identity_token:
        cfg["identitytoken"] = cred.identity_token
    elif cred.has_basic:
        cfg["username"] = cred.username or ""
        cfg["password"] = cred.password or ""
    else:
        return None
    return cfg


def secrets_of(creds: Iterable[Credential | None]) -> list[str]:
    out = []
    for c in creds:
        if c is not None:
            out += [s for s in (c.password, c.identity_token, c.registry_token) if s]
    return out


@dataclass
class Tally:
    """Bytes and layer outcomes read from one pull or push progress stream.

    dockerd throttles progress events (a small layer may report none), so the byte
    counts are a lower bound of what moved.
    """

    progress: ProgressFn
    phase: str  # "Downloading" or "Pushing"
    bytes: int = 0
    seen: dict[str, int] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    digest: str | None = None
    copied: int = 0
    skipped: int = 0
    mounted: int = 0

    def restart(self) -> None:
        """A new attempt re-reports layers from zero; bytes already moved stay counted."""
        self.seen.clear()
        self.totals.clear()
        self.error, self.digest = None, None
        self.copied = self.skipped = self.mounted = 0

    def _advance(self, lid: str, current: int) -> None:
        delta = current - self.seen.get(lid, 0)
        if delta > 0:
            self.seen[lid] = current
            self.bytes += delta
            self.progress(delta)

    def feed(self, ev: Mapping[str, Any]) -> None:
        if ev.get("error") or ev.get("errorDetail"):
            detail = ev.get("errorDetail") or {}
            msg = detail.get("message") if isinstance(detail, dict) else None
            if self.error is None:
                self.error = str(msg or ev.get("error") or "unknown error")
            return
        aux = ev.get("aux")
        if isinstance(aux, dict) and isinstance(aux.get("Digest"), str):
            self.digest = aux["Digest"]
        status = str(ev.get("status") or "")
        lid = str(ev.get("id") or "")
        if status == self.phase:
            detail = ev.get("progressDetail") or {}
            current = detail.get("current") if isinstance(detail, dict) else None
            total = detail.get("total") if isinstance(detail, dict) else None
            if isinstance(total, int):
                self.totals[lid] = total
            if isinstance(current, int):
                self._advance(lid, current)
        elif status == "Download complete":
            # dockerd throttles progress events; the last chunk of a layer is often unreported.
            self._advance(lid, self.totals.get(lid, 0))
        elif status == "Pushed":
            self.copied += 1
        elif status == "Layer already exists":
            self.skipped += 1
        elif status.startswith("Mounted from"):
            self.mounted += 1


def prune(api: Any, keep_duration: float, errors: list[str]) -> tuple[int, int]:
    """Dangling images and build cache older than keep_duration; returns (bytes, items)."""
    freed_bytes = freed_items = 0
    # No ``until`` for 0: the daemon rounds it to whole seconds, sparing what was made this second.
    age: dict[str, Any] = {"until": f"{int(keep_duration)}s"} if keep_duration >= 1 else {}
    try:
        pruned = api.prune_images(filters={"dangling": True, **age})
        freed_items += len([r for r in pruned.get("ImagesDeleted") or [] if r.get("Deleted")])
        freed_bytes += int(pruned.get("SpaceReclaimed") or 0)
    except docker.errors.APIError as e:
        errors.append(f"prune images: {e.explanation or e}")
    try:
        builds = api.prune_builds(filters=age or None)
        freed_items += len(builds.get("CachesDeleted") or [])
        freed_bytes += int(builds.get("SpaceReclaimed") or 0)
    except docker.errors.APIError as e:
        # Daemons without a build cache (or BuildKit) answer 404/501: nothing to prune.
        text = str(e.explanation or e)
        if e.status_code not in (404, 501) and "not supported" not in text.lower():
            errors.append(f"prune build cache: {text}")
    except docker.errors.InvalidVersion:
        pass
    return freed_bytes, freed_items


def probe_unix(host: str) -> None:
    """Fail clearly (and without the SDK's leaked socket) when the daemon's socket is not there."""
    path = host.removeprefix("unix://")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        try:
            s.connect(path)
        except OSError as e:
            raise TransportError(f"docker daemon not reachable at {host}: {e.strerror or e}") from None


def platform_name(p: Mapping[str, Any]) -> str:
    parts = [p.get("os"), p.get("architecture"), p.get("variant")]
    return "/".join(str(x) for x in parts if x)


def scrub(text: str, secrets: list[str]) -> str:
    for s in secrets:
        text = text.replace(s, "***")
    return text
