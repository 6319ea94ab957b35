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
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions

from config import defaults
from config.jobs import DestinationResult, SyncJob, SyncResult
from config.platform import Platform
from workers.engine.docker_daemon import (
    Tally,
    auth_config,
    classify,
    platform_name,
    probe_unix,
    prune,
    scrub,
    secrets_of,
    what_is_missing,
)
from workers.engine.docker_plan import Plan, Target, plan_sync
from workers.engine.errors import ManifestError, NotFound, RegistryError, TransportError
from workers.engine.keychain import Credential, Keychain
from workers.engine.protocols import CleanupStats, ProgressFn
from workers.engine.results import sync_result
from workers.engine.retry import RetryPolicy

T = TypeVar("T")

# How often a transfer waiting for one of the node's max_parallelism slots looks again.
SLOT_POLL = 0.05

LIMITS_WARNING = (
    "docker engine: layers were re-compressed on push and each tag holds a single platform, "
    "so destination digests differ from the source's"
)


class DockerEngine:
    """Copies images with a Docker daemon: one pull per platform, then tag and push per destination."""

    name = "docker"

    def __init__(
        self,
        docker_host: str | None,
        keychain: Keychain,
        *,
        attempts: int = defaults.RETRY_ATTEMPTS,
        base_delay: float = defaults.RETRY_BASE_DELAY,
        max_delay: float = defaults.RETRY_MAX_DELAY,
        keep_duration: float = defaults.CACHE_KEEP_DURATION,
        default_platform: str = "linux/amd64",
        timeout: float = 300.0,
        sleep: Callable[[float], None] = time.sleep,
        busy_lock: Path | None = None,
        max_parallelism: int = 0,
        slot_dir: Path | None = None,
    ) -> None:
        self.docker_host = docker_host
        # Pulls and pushes at once on this node (0: no limit), as BuildKit's max-parallelism caps its
        # workers: each holds one of max_parallelism lock files in slot_dir, shared by every worker
        # process of the node, so the daemon never holds more images in flight than that.
        self.max_parallelism = max_parallelism
        self.slot_dir = slot_dir
        # Shared by every sync on this node, exclusive for pruning: a freshly pulled image is
        # briefly untagged, and images built reproducibly claim to be decades old, so a prune
        # running beside a pull could delete it.
        self.busy_lock = busy_lock
        # Cleanup prunes dangling images and build cache older than this.
        self.keep_duration = keep_duration
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
                    probe_unix(self.docker_host)
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
                e.message = scrub(e.message, secrets)
                raise
            except docker.errors.APIError as e:
                text = scrub(str(e.explanation or e), secrets)
                raise classify(text, status=e.status_code, reference=reference) from None
            except (requests.exceptions.RequestException, docker.errors.DockerException) as e:
                text = scrub(f"docker daemon: {type(e).__name__}: {e}", secrets)
                raise TransportError(text, reference=reference) from None

        return self._retry.call(attempt, what=f"{what} {reference}")

    # -- sync ------------------------------------------------------------------------

    def sync(self, job: SyncJob, progress: ProgressFn, *, expect: ProgressFn | None = None) -> SyncResult:
        # dockerd learns layer sizes one by one while pulling: no total to announce up front.
        with self._node_lock(exclusive=False, wait=True):
            return self._sync(job, progress)

    @contextlib.contextmanager
    def _transfer_slot(self) -> Iterator[None]:
        """One of the node's ``max_parallelism`` pull/push slots, held for one pull or push."""
        if self.max_parallelism <= 0 or self.slot_dir is None:
            yield
            return
        self.slot_dir.mkdir(parents=True, exist_ok=True)
        fd = None
        while fd is None:
            for i in range(self.max_parallelism):
                candidate = os.open(self.slot_dir / f"slot-{i}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(candidate, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(candidate)
                    continue
                fd = candidate
                break
            else:
                time.sleep(SLOT_POLL)  # every slot busy: another process's transfer holds it
        try:
            yield
        finally:
            os.close(fd)

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
        try:
            plan = plan_sync(job, self.default_platform)
        except (ValueError, RegistryError) as e:
            return sync_result(job, self.name, failures=[e])
        done = functools.partial(sync_result, job, self.name, local_refs=plan.local_refs)
        try:  # a credential helper may fail; that ends this image, not the worker
            src_cred = self.keychain.resolve(plan.source.registry)
            dst_creds = {
                t.destination.registry: self.keychain.resolve(t.destination.registry)
                for ts in plan.targets.values()
                for t in ts
            }
        except RegistryError as e:
            return done(failures=[e])
        secrets = secrets_of([src_cred, *dst_creds.values()])
        down = Tally(progress, "Downloading")
        source_digest: str | None = None
        warnings: list[str] = []
        try:
            with self._transfer_slot():  # the lookup and every platform's pull: one slot
                dist = self._call(
                    "inspect",
                    str(plan.source),
                    lambda: self.client.api.inspect_distribution(
                        plan.pull_ref, auth_config=auth_config(plan.source.registry, src_cred)
                    ),
                    secrets,
                )
                source_digest = dist["Descriptor"]["digest"]
                available = [p for p in dist.get("Platforms") or [] if isinstance(p, dict)]
                warnings += self._platform_warnings(plan, available)
                image_ids = {p: self._pull(plan, p, src_cred, down, secrets) for p in plan.platforms}
        except RegistryError as e:
            return done(failures=[what_is_missing(e, plan.source).with_reference(plan.source)],
                        source_digest=source_digest, bytes_downloaded=down.bytes, warnings=warnings)

        pushed = [
            self._push(t, image_ids[p], dst_creds[t.destination.registry], progress, secrets, source_digest)
            for p in plan.platforms
            for t in plan.targets[p]
        ]
        destinations = [d for d, _ in pushed]
        if len(plan.platforms) > 1:
            asked = sorted({t.destination.tag or "" for ts in plan.targets.values() for t in ts} - {""})
            tags = sorted({t.tag for ts in plan.targets.values() for t in ts})
            warnings.append(
                "docker engine cannot build a multi-platform index: pushed one tag per platform "
                f"({', '.join(tags)}) instead of {', '.join(asked) or 'one tag'} for all platforms"
            )
        if any(d.digest_changed for d in destinations):
            warnings.append(LIMITS_WARNING)
        return done(
            failures=[e for _, e in pushed if e is not None],
            destinations=destinations,
            source_digest=source_digest,
            bytes_downloaded=down.bytes,
            bytes_uploaded=sum(d.bytes_transferred for d in destinations),
            warnings=warnings,
        )

    def _platform_warnings(self, plan: Plan, available: list[dict[str, Any]]) -> list[str]:
        names = [platform_name(p) for p in available]
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

    def _pull(self, plan: Plan, platform: Platform, cred: Credential | None, tally: Tally, secrets: list[str]) -> str:
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
                raise classify(scrub(tally.error, secrets), reference=str(src))
            img = self.client.api.inspect_image(plan.pull_ref)
            got = {"os": img.get("Os"), "architecture": img.get("Architecture"), "variant": img.get("Variant")}
            if plan.explicit and not platform.matches(got):
                # Another pull of this tag for a different platform won the race for the local name.
                raise RegistryError(
                    f"pulled {platform_name(got)} while {platform} was asked for", reference=str(src), temporary=True
                )
            return str(img["Id"])

        return self._call("pull", f"{src} ({platform})", run, secrets)

    def _push(
        self,
        t: Target,
        image_id: str,
        cred: Credential | None,
        progress: ProgressFn,
        secrets: list[str],
        source_digest: str | None,
    ) -> tuple[DestinationResult, RegistryError | None]:
        up = Tally(progress, "Pushing")
        auth = auth_config(t.destination.registry, cred)

        def run() -> str:
            up.restart()
            self.client.api.tag(image_id, t.name, t.tag, force=True)
            for ev in self.client.api.push(t.name, tag=t.tag, stream=True, decode=True, auth_config=auth):
                up.feed(ev)
            if up.error is not None:
                raise classify(scrub(up.error, secrets), reference=t.ref)
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
            with self._transfer_slot():
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

    def cleanup(self, remove: Sequence[str] = ()) -> CleanupStats:
        """Remove the given local refs, then prune dangling images and build cache older than keep_duration."""
        freed_bytes = freed_items = 0
        errors: list[str] = []
        try:
            api = self.client.api
            for ref in dict.fromkeys(remove):
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
                    pruned_bytes, pruned_items = prune(api, self.keep_duration, errors)
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


