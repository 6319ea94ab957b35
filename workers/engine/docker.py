"""The classic path: ``docker pull``, ``docker tag``, ``docker push`` through a node's Docker Engine.

What it cannot do, and says so in every result: the daemon stores one platform per
local image, so an index is never copied as an index (one tag per platform is pushed
instead), and layers are re-compressed on push, so destination digests differ from
the source's. The registry engine keeps digests; this one exists for nodes where only
a Docker daemon can reach the source.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions

from config.jobs import DestinationResult, SyncJob, SyncResult
from config.platform import Platform
from config.reference import DOCKER_HUB, Reference
from workers.engine.cache import CleanupStats
from workers.engine.errors import (
    Denied,
    InvalidRequest,
    ManifestError,
    NotFound,
    RateLimited,
    RegistryError,
    ServerError,
    TransportError,
    Unauthorized,
    missing,
)
from workers.engine.keychain import DOCKER_HUB_SERVER_URL, Credential, Keychain
from workers.engine.protocols import ProgressFn
from workers.engine.retry import RetryPolicy

T = TypeVar("T")
log = logging.getLogger(__name__)

LIMITS_WARNING = (
    "docker engine: layers were re-compressed on push and each tag holds a single platform, "
    "so destination digests differ from the source's"
)

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


def _secrets(creds: Iterable[Credential | None]) -> list[str]:
    out = []
    for c in creds:
        if c is not None:
            out += [s for s in (c.password, c.identity_token, c.registry_token) if s]
    return out


def platform_tag(tag: str, platform: Platform) -> str:
    """``v1`` + ``linux/arm64/v8`` -> ``v1-linux-arm64-v8`` (tags allow at most 128 characters)."""
    parts = [tag, platform.os, platform.architecture] + ([platform.variant] if platform.variant else [])
    return "-".join(parts)[:128]


@dataclass(frozen=True)
class _Target:
    """One tag pushed for one platform."""

    destination: Reference  # as given in the job
    name: str  # registry/repository
    tag: str

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"


@dataclass(frozen=True)
class _Plan:
    source: Reference
    pull_ref: str  # what the daemon names the pulled image
    platforms: tuple[Platform, ...]
    explicit: bool  # platforms came from the job, not the default
    targets: Mapping[Platform, tuple[_Target, ...]]

    @property
    def local_refs(self) -> list[str]:
        refs = [self.pull_ref]
        for ts in self.targets.values():
            refs += [t.ref for t in ts]
        return list(dict.fromkeys(refs))


@dataclass
class _Tally:
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


class DockerEngine:
    """Copies images with a Docker daemon: one pull per platform, then tag and push per destination."""

    name = "docker"

    def __init__(
        self,
        docker_host: str | None,
        keychain: Keychain,
        *,
        attempts: int = 6,
        base_delay: float = 0.5,
        max_delay: float = 30.0,
        default_platform: str = "linux/amd64",
        timeout: float = 300.0,
        sleep: Callable[[float], None] = time.sleep,
        busy_lock: Path | None = None,
    ) -> None:
        self.docker_host = docker_host
        # Shared by every sync on this node, exclusive for pruning: a freshly pulled image is
        # briefly untagged, and images built reproducibly claim to be decades old, so a prune
        # running beside a pull could delete it.
        self.busy_lock = busy_lock
        self.keychain = keychain
        self.default_platform = Platform.parse(default_platform)
        self.timeout = timeout
        self._retry = RetryPolicy(attempts=attempts, base_delay=base_delay, max_delay=max_delay, sleep=sleep)
        self._client: docker.DockerClient | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"DockerEngine(docker_host={self.docker_host!r})"

    # -- daemon connection -----------------------------------------------------------

    @property
    def client(self) -> docker.DockerClient:
        """Connected on first use, so a node whose daemon is down still starts (and retries)."""
        with self._lock:
            if self._client is None:
                if self.docker_host and self.docker_host.startswith("unix://"):
                    _probe_unix(self.docker_host)
                if self.docker_host:
                    self._client = docker.DockerClient(
                        base_url=self.docker_host, version="auto", timeout=int(self.timeout)
                    )
                else:
                    self._client = docker.from_env(version="auto", timeout=int(self.timeout))
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _call(self, what: str, reference: str, fn: Callable[[], T], secrets: list[str]) -> T:
        """``fn()`` with daemon failures typed, secrets scrubbed, and temporary ones retried."""

        def attempt() -> T:
            try:
                return fn()
            except RegistryError as e:
                e.message = _scrub(e.message, secrets)
                raise
            except docker.errors.APIError as e:
                text = _scrub(str(e.explanation or e), secrets)
                raise classify(text, status=e.status_code, reference=reference) from None
            except (requests.exceptions.RequestException, docker.errors.DockerException) as e:
                text = _scrub(f"docker daemon: {type(e).__name__}: {e}", secrets)
                raise TransportError(text, reference=reference) from None

        return self._retry.call(attempt, what=f"{what} {reference}")

    # -- planning --------------------------------------------------------------------

    def _plan(self, job: SyncJob) -> _Plan:
        src = Reference.parse(job.source)
        explicit = bool(job.platforms)
        platforms = tuple(dict.fromkeys(Platform.parse(p) for p in job.platforms)) or (self.default_platform,)
        pull_ref = f"{src.name}@{src.digest}" if src.digest else f"{src.name}:{src.tag}"
        targets: dict[Platform, tuple[_Target, ...]] = {}
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
                ts.append(_Target(d, d.name, tag))
            targets[p] = tuple(ts)
        return _Plan(src, pull_ref, platforms, explicit, targets)

    def images_for(self, job: SyncJob) -> list[str]:
        """Every local reference a sync of ``job`` pulls or tags: what its cleanup should remove."""
        try:
            return self._plan(job).local_refs
        except (ValueError, RegistryError):
            return []

    # -- sync ------------------------------------------------------------------------

    def sync(self, job: SyncJob, progress: ProgressFn, *, expect: ProgressFn | None = None) -> SyncResult:
        # dockerd learns layer sizes one by one while pulling: no total to announce up front.
        with self._node_lock(exclusive=False, wait=True):
            return self._sync(job, progress)

    @contextlib.contextmanager
    def _node_lock(self, *, exclusive: bool, wait: bool) -> Iterator[bool]:
        """Yields whether the lock is held (always, when waiting or when no lock is configured)."""
        if self.busy_lock is None:
            yield True
            return
        self.busy_lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.busy_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
            try:
                fcntl.flock(fd, flags)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def _sync(self, job: SyncJob, progress: ProgressFn) -> SyncResult:
        started = time.time()
        result = SyncResult(
            batch_id=job.batch_id,
            source=job.source,
            status="failed",
            engine=self.name,
            line=job.line,
            started_at=started,
        )
        try:
            plan = self._plan(job)
        except (ValueError, RegistryError) as e:
            return _failed(result, e, started)
        result.local_refs = plan.local_refs
        try:  # a credential helper may fail; that ends this image, not the worker
            src_cred = self.keychain.resolve(plan.source.registry)
            dst_creds = {
                t.destination.registry: self.keychain.resolve(t.destination.registry)
                for ts in plan.targets.values()
                for t in ts
            }
        except RegistryError as e:
            return _failed(result, e, started)
        secrets = _secrets([src_cred, *dst_creds.values()])
        down = _Tally(progress, "Downloading")
        try:
            dist = self._call(
                "inspect",
                str(plan.source),
                lambda: self.client.api.inspect_distribution(
                    plan.pull_ref, auth_config=auth_config(plan.source.registry, src_cred)
                ),
                secrets,
            )
            result.source_digest = dist["Descriptor"]["digest"]
            available = [p for p in dist.get("Platforms") or [] if isinstance(p, dict)]
            result.warnings += self._platform_warnings(plan, available)
            image_ids: dict[Platform, str] = {}
            for p in plan.platforms:
                image_ids[p] = self._pull(plan, p, src_cred, down, secrets)
        except RegistryError as e:
            result.bytes_downloaded = down.bytes
            return _failed(result, _what_is_missing(e, plan.source).with_reference(plan.source), started)
        result.bytes_downloaded = down.bytes

        failures: list[RegistryError] = []
        for p in plan.platforms:
            for t in plan.targets[p]:
                dres = self._push(
                    t, image_ids[p], dst_creds[t.destination.registry], progress, secrets, result.source_digest
                )
                result.destinations.append(dres[0])
                result.bytes_uploaded += dres[0].bytes_transferred
                if dres[1] is not None:
                    failures.append(dres[1])
        if len(plan.platforms) > 1:
            asked = sorted({t.destination.tag or "" for ts in plan.targets.values() for t in ts} - {""})
            pushed = sorted({t.tag for ts in plan.targets.values() for t in ts})
            result.warnings.append(
                "docker engine cannot build a multi-platform index: pushed one tag per platform "
                f"({', '.join(pushed)}) instead of {', '.join(asked) or 'one tag'} for all platforms"
            )
        if any(d.digest_changed for d in result.destinations):
            result.warnings.append(LIMITS_WARNING)
        result.duration_s = time.time() - started
        if failures:
            first = failures[0]
            result.status = "failed"
            result.error = "; ".join(f"{d.destination}: {d.error}" for d in result.destinations
                                     if d.status == "failed")
            result.error_code = first.code
            result.temporary = any(f.temporary for f in failures)
        else:
            result.status = "synced"
        return result

    def _platform_warnings(self, plan: _Plan, available: list[dict[str, Any]]) -> list[str]:
        names = [_platform_name(p) for p in available]
        if plan.explicit:
            missing = [str(p) for p in plan.platforms if available and not any(p.matches(a) for a in available)]
            if missing:
                raise NotFound(
                    f"no {', '.join(missing)} image in the source (it has {', '.join(names)})",
                    reference=str(plan.source),
                )
            return []
        if len(available) > 1:
            return [
                f"source is a multi-platform index ({', '.join(names)}); the docker engine copied only "
                f"{plan.platforms[0]} (list platforms in the job to copy others)"
            ]
        return []

    def _pull(self, plan: _Plan, platform: Platform, cred: Credential | None, tally: _Tally, secrets: list[str]) -> str:
        """Pull one platform; returns the local image ID."""
        src = plan.source
        repo, ref = src.name, (src.digest or src.tag)

        def run() -> str:
            tally.restart()
            stream = self.client.api.pull(
                repo,
                tag=ref,
                platform=str(platform),
                stream=True,
                decode=True,
                auth_config=auth_config(src.registry, cred),
            )
            for ev in stream:  # read to the end: the daemon closes the stream after an error
                tally.feed(ev)
            if tally.error is not None:
                raise classify(_scrub(tally.error, secrets), reference=str(src))
            img = self.client.api.inspect_image(plan.pull_ref)
            got = {"os": img.get("Os"), "architecture": img.get("Architecture"), "variant": img.get("Variant")}
            if plan.explicit and not platform.matches(got):
                # Another pull of this tag for a different platform won the race for the local name.
                raise RegistryError(
                    f"pulled {_platform_name(got)} while {platform} was asked for", reference=str(src), temporary=True
                )
            return str(img["Id"])

        return self._call("pull", f"{src} ({platform})", run, secrets)

    def _push(
        self,
        t: _Target,
        image_id: str,
        cred: Credential | None,
        progress: ProgressFn,
        secrets: list[str],
        source_digest: str | None,
    ) -> tuple[DestinationResult, RegistryError | None]:
        up = _Tally(progress, "Pushing")
        auth = auth_config(t.destination.registry, cred)

        def run() -> str:
            up.restart()
            self.client.api.tag(image_id, t.name, t.tag, force=True)
            for ev in self.client.api.push(t.name, tag=t.tag, stream=True, decode=True, auth_config=auth):
                up.feed(ev)
            if up.error is not None:
                raise classify(_scrub(up.error, secrets), reference=t.ref)
            if up.digest is None:
                raise RegistryError("push ended without reporting a digest", reference=t.ref, temporary=True)
            # Check the registry now serves what the push reported under this tag.
            dist = self.client.api.inspect_distribution(t.ref, auth_config=auth)
            served = dist["Descriptor"]["digest"]
            if served != up.digest:
                raise ManifestError(
                    f"{t.ref} resolves to {served}, but the push reported {up.digest}", reference=t.ref, temporary=True
                )
            return up.digest

        try:
            digest = self._call("push", t.ref, run, secrets)
        except RegistryError as e:
            e.with_reference(t.ref)
            return DestinationResult(destination=t.ref, status="failed", error=e.reason(t.ref),
                                     bytes_transferred=up.bytes), e
        return DestinationResult(
            destination=t.ref,
            status="synced",
            digest=digest,
            digest_changed=digest != source_digest,
            blobs_copied=up.copied,
            blobs_mounted=up.mounted,
            blobs_skipped=up.skipped,
            bytes_transferred=up.bytes,
        ), None

    # -- cleanup ---------------------------------------------------------------------

    @staticmethod
    def _prune(api: Any, keep_duration: float, errors: list[str]) -> tuple[int, int]:
        """Dangling images and build cache older than keep_duration; returns (bytes, items)."""
        freed_bytes = freed_items = 0
        until = f"{max(0, int(keep_duration))}s"
        try:
            pruned = api.prune_images(filters={"dangling": True, "until": until})
            freed_items += len([r for r in pruned.get("ImagesDeleted") or [] if r.get("Deleted")])
            freed_bytes += int(pruned.get("SpaceReclaimed") or 0)
        except docker.errors.APIError as e:
            errors.append(f"prune images: {e.explanation or e}")
        try:
            builds = api.prune_builds(filters={"until": until})
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

    def cleanup(self, keep_duration: float, remove: list[str] | None = None) -> CleanupStats:
        """Remove the given local refs, then prune dangling images and build cache older than keep_duration."""
        freed_bytes = freed_items = 0
        errors: list[str] = []
        try:
            api = self.client.api
            for ref in dict.fromkeys(remove or []):
                try:
                    img = api.inspect_image(ref)
                    removed = api.remove_image(ref, force=True, noprune=False)
                except docker.errors.NotFound:
                    continue
                except docker.errors.APIError as e:
                    # Another cleanup on this node may have removed the image between the two calls.
                    if "unrecognized image" not in str(e.explanation or e):
                        errors.append(f"remove {ref}: {e.explanation or e}")
                    continue
                if any(isinstance(r, dict) and r.get("Deleted") == img["Id"] for r in removed or []):
                    freed_bytes += int(img.get("Size") or 0)
                    freed_items += 1
            with self._node_lock(exclusive=True, wait=False) as idle:
                if idle:  # a busy node is pruned by the next cleanup that finds it idle
                    pruned_bytes, pruned_items = self._prune(api, keep_duration, errors)
                    freed_bytes += pruned_bytes
                    freed_items += pruned_items
            df = api.df()
            images = df.get("Images") or []
            kept_bytes, kept_items = int(df.get("LayersSize") or 0), len(images)
        except RegistryError as e:
            errors.append(str(e))
            kept_bytes = kept_items = 0
        except (requests.exceptions.RequestException, docker.errors.DockerException) as e:
            errors.append(f"docker daemon: {type(e).__name__}: {e}")
            kept_bytes = kept_items = 0
        return CleanupStats(
            freed_bytes=freed_bytes,
            freed_items=freed_items,
            kept_bytes=kept_bytes,
            kept_items=kept_items,
            errors=tuple(errors),
        )


def _probe_unix(host: str) -> None:
    """Fail clearly (and without the SDK's leaked socket) when the daemon's socket is not there."""
    path = host.removeprefix("unix://")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        try:
            s.connect(path)
        except OSError as e:
            raise TransportError(f"docker daemon not reachable at {host}: {e.strerror or e}") from None


def _platform_name(p: Mapping[str, Any]) -> str:
    parts = [p.get("os"), p.get("architecture"), p.get("variant")]
    return "/".join(str(x) for x in parts if x)


def _scrub(text: str, secrets: list[str]) -> str:
    for s in secrets:
        text = text.replace(s, "***")
    return text


def _what_is_missing(e: RegistryError, src: Reference) -> RegistryError:
    """dockerd's "manifest unknown" / "name unknown", said as the registry engine says them."""
    if not isinstance(e, NotFound):
        return e
    text = e.message.lower()
    if "name unknown" in text or "repository name not known" in text:
        return missing(src, repository=False)
    if "manifest unknown" in text:
        return missing(src, repository=None)  # dockerd asks by HEAD, whose 404 does not say which
    return e


def _failed(result: SyncResult, e: Exception, started: float) -> SyncResult:
    result.status = "failed"
    result.error = e.reason(result.source) if isinstance(e, RegistryError) else str(e)
    result.error_code = e.code if isinstance(e, RegistryError) else "INVALID_REFERENCE"
    result.temporary = e.temporary if isinstance(e, RegistryError) else False
    result.duration_s = time.time() - started
    return result
