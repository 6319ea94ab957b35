"""Per-process state of a worker: settings handed over by the entry point, engines built lazily.

Engines hold connection pools, so they are built after the pool forks (first use in each
child process) and reused by every task that process runs.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from config.jobs import CleanupResult
from config.settings import FerrySettings, RegistryConfig

# Imported here, in the worker's main process, so pool processes inherit them at fork
# instead of each importing httpx, docker and friends again on its first task.
from contract.batches import BatchStore
from contract.broker import CLEANUP_TASK, SYNC_QUEUE, node_queue
from contract.redis_client import redis_client
from contract.wire import TaskPublisher
from workers.cluster.coordinator import RedisCoordinator
from workers.cluster.ratelimit import Limit
from workers.engine.cache import BlobCache, CachePolicy
from workers.engine.docker import DockerEngine
from workers.engine.keychain import Credential, Keychain, configured_keychain, docker_config_file
from workers.engine.local_coordinator import LocalCoordinator
from workers.engine.protocols import Coordinator, Engine, Observer
from workers.engine.registry import RegistryEngine, RegistryOptions
from workers.engine.tls import TlsConfig, TlsPolicy, client_context
from workers.metrics import NoRecorder, Recorder
from workers.upkeep import UpkeepConfig

# How long a worker keeps retrying outcome writes while Redis restarts.
BROKER_OUTAGE_S = 60.0

_settings: FerrySettings | None = None
_recorder: Recorder = NoRecorder()
_lock = threading.Lock()
_state: dict[str, object] = {}
_pid = 0


def configure(settings: FerrySettings, recorder: Recorder | None = None) -> None:
    global _settings, _recorder
    _settings = settings
    _recorder = recorder or NoRecorder()


def recorder() -> Recorder:
    """Where this worker counts what it does (nothing is counted when metrics are off)."""
    return _recorder


def preload() -> None:
    """Work done once in the worker's main process so every forked pool process shares it."""
    client_context()


def tls_configs(s: FerrySettings) -> dict[str, TlsConfig]:
    return {h: TlsConfig(r.ca_file, r.client_cert, r.client_key, r.insecure)
            for h, r in s.registries.items() if r.ca_file or r.client_cert or r.insecure}


def tls_policy(s: FerrySettings) -> TlsPolicy:
    """The TLS rules of these settings; ``check()`` on it reads every file they name."""
    return TlsPolicy(tls_configs(s), s.insecure_registries)


def settings() -> FerrySettings:
    if _settings is None:
        raise RuntimeError("worker runtime is not configured; start workers with `python -m workers`")
    return _settings


def _local() -> dict[str, object]:
    global _pid
    if _pid != os.getpid():  # forked: nothing from the parent's pools may be reused
        _state.clear()
        _pid = os.getpid()
    return _state


def store() -> BatchStore:
    with _lock:
        st = _local()
        if "store" not in st:
            s = settings()
            url = (s.result_url or s.broker_url)
            assert url is not None
            st["store"] = BatchStore.from_url(url.get_secret_value(), s.result_ttl, ride_out=BROKER_OUTAGE_S)
        return st["store"]  # type: ignore[return-value]


def publisher() -> TaskPublisher:
    """Sends the tasks a worker adds to a batch (a selector line's tags, a schedule's run)."""
    with _lock:
        st = _local()
        if "publisher" not in st:
            url = settings().broker_url
            assert url is not None
            st["publisher"] = TaskPublisher(redis_client(url.get_secret_value(), ride_out=BROKER_OUTAGE_S))
        return st["publisher"]  # type: ignore[return-value]


def engine(name: str) -> Engine:
    with _lock:
        st = _local()
        key = f"engine:{name}"
        if key not in st:
            st[key] = build_engine(name, settings(), _coordinator(st), _recorder)
        return st[key]  # type: ignore[return-value]


def _coordinator(st: dict[str, object]) -> Coordinator:
    """This process's link to the cluster (a local stand-in when no Redis is configured)."""
    if "coordinator" not in st:
        st["coordinator"] = build_coordinator(settings())
    return st["coordinator"]  # type: ignore[return-value]


def build_coordinator(s: FerrySettings) -> Coordinator:
    c = s.coordination
    url = c.url or s.broker_url
    if not c.enabled or url is None:
        return LocalCoordinator()
    limits = {h: Limit(r.max_concurrency, r.requests_per_second)
              for h, r in s.registries.items() if r.max_concurrency or r.requests_per_second}
    counts = {h: 1 + len(r.extra_credentials) for h, r in s.registries.items() if r.extra_credentials}
    return RedisCoordinator.from_url(
        url.get_secret_value(), owner=f"{s.node}:{os.getpid()}", ledger_ttl=float(c.ledger_ttl),
        lease_ttl=c.lease_ttl, limits=limits, credential_counts=counts)


def upkeep_config(s: FerrySettings) -> UpkeepConfig:
    return UpkeepConfig(
        node=s.node, engine=s.engine, cache_dir=cache_dir(s), min_free_bytes=int(s.cache.min_free_bytes),
        sync_queue=SYNC_QUEUE, node_queue=node_queue(s.node), cleanup_task=CLEANUP_TASK,
        cleanup_interval=float(s.cleanup_interval), check_interval=float(s.disk_check_interval))


def cache_dir(s: FerrySettings) -> Path:
    return Path(os.path.expanduser(s.cache.dir)) / s.node


def build_keychain(s: FerrySettings, choose: Callable[[str], int]) -> Keychain:
    """The credentials in ferry's settings, then docker's config; ``choose`` rotates among several."""
    configured = {host: _credentials(r) for host, r in s.registries.items()}
    return configured_keychain(configured, docker_config_file(s.docker_config), choose)


def _credentials(r: RegistryConfig) -> list[Credential]:
    found = []
    if r.username or r.password:
        found.append(Credential(username=r.username, password=r.password.get_secret_value() if r.password else None))
    found += [Credential(username=u, password=p.get_secret_value()) for u, p in r.extra_credentials]
    return found


def build_engine(name: str, s: FerrySettings, coordinator: Coordinator | None = None,
                 observer: Observer | None = None) -> Engine:
    keychain = build_keychain(s, coordinator.credential_index if coordinator else lambda registry: 0)
    if name == "docker":
        return DockerEngine(
            docker_host=s.docker_host,
            keychain=keychain,
            attempts=s.retry.attempts,
            base_delay=s.retry.base_delay,
            max_delay=s.retry.max_delay,
            keep_duration=float(s.cache.keep_duration),
            busy_lock=cache_dir(s) / "docker.lock",
            max_parallelism=s.cache.max_parallelism,
            slot_dir=cache_dir(s) / "docker-slots",
        )
    if name == "registry":
        # Built even when copies bypass it: cleanup still applies the policy to what is there.
        cache = BlobCache(cache_dir(s), cache_policy(s))
        options = RegistryOptions(
            insecure_registries=tuple(s.insecure_registries),
            tls=tls_configs(s),
            blob_concurrency=s.blob_concurrency,
            slots=s.concurrency if s.pool == "threads" else 1,
            chunk_size=int(s.chunk_size),
            retry_attempts=s.retry.attempts,
            retry_base_delay=s.retry.base_delay,
            retry_max_delay=s.retry.max_delay,
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
            mirrors={h: list(r.mirrors) for h, r in s.registries.items() if r.mirrors},
            quota_floor=s.coordination.quota_floor,
            use_cache=s.cache.enabled,
            cache_single_target=s.cache.single_target,
            range_parallel=s.range_parallel,
            range_threshold=int(s.range_threshold),
            referrers=s.referrers,
        )
        return RegistryEngine(options, keychain=keychain, cache=cache, coordinator=coordinator,
                              observer=observer)
    raise ValueError(f"unknown engine {name!r}: choose registry or docker")


def cache_policy(s: FerrySettings) -> CachePolicy:
    return CachePolicy(
        keep_duration=float(s.cache.keep_duration),
        keep_bytes=int(s.cache.keep_bytes),
        min_free_bytes=int(s.cache.min_free_bytes),
    )


def run_cleanup(engine_name: str, remove: list[str], for_task: str | None) -> CleanupResult:
    """Apply this node's disk policy for one engine and say what it freed."""
    s = settings()
    stats = engine(engine_name).cleanup(remove)
    return CleanupResult(
        node=s.node,
        engine=engine_name,
        freed_bytes=stats.freed_bytes,
        freed_items=stats.freed_items,
        kept_bytes=stats.kept_bytes,
        kept_items=stats.kept_items,
        for_task=for_task,
        errors=list(stats.errors),
    )
