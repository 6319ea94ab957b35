"""Typed settings, read from the environment (prefix ``FERRY_``) at entry points only.

Library code never imports this module to read values; entry points load a
``FerrySettings`` once and pass plain values inward.
"""

from __future__ import annotations

import socket
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ByteSize,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from config import defaults
from config.schedules import Schedule

EngineName = Literal["registry", "docker"]


class RegistryConfig(BaseModel):
    """Per-registry options, keyed by registry host (``docker.io``, ``harbor.example.com:8443``)."""

    username: str | None = None
    password: SecretStr | None = None
    # Extra credentials rotated when the first one's pull quota is spent.
    extra_credentials: list[tuple[str, SecretStr]] = Field(default_factory=list)
    # HTTPS without verifying the certificate; plain HTTP when the registry does not speak TLS.
    insecure: bool = False
    # A PEM bundle trusted for this registry besides the default CAs (a private CA).
    ca_file: str | None = None
    # mTLS: the certificate (PEM) presented to this registry, and its key (omit when in the same file).
    client_cert: str | None = None
    client_key: str | None = None
    mirrors: list[str] = Field(default_factory=list)
    max_concurrency: PositiveInt | None = None
    requests_per_second: PositiveFloat | None = None

    @model_validator(mode="after")
    def _key_needs_cert(self) -> RegistryConfig:
        if self.client_key and not self.client_cert:
            raise ValueError("client_key is set without client_cert")
        return self


class RetrySettings(BaseModel):
    """Retry budget for temporary registry errors (one owner: the transport layer)."""

    attempts: PositiveInt = defaults.RETRY_ATTEMPTS
    base_delay: PositiveFloat = defaults.RETRY_BASE_DELAY
    max_delay: PositiveFloat = defaults.RETRY_MAX_DELAY


class CacheSettings(BaseModel):
    """Per-node blob cache policy; names follow BuildKit's GC settings."""

    enabled: bool = True
    # Also cache single-destination syncs (by default only multi-target ones use the cache).
    single_target: bool = False
    dir: str = "~/.cache/ferry/blobs"
    keep_duration: NonNegativeInt = defaults.CACHE_KEEP_DURATION
    keep_bytes: ByteSize = ByteSize(defaults.CACHE_KEEP_BYTES)
    min_free_bytes: ByteSize = ByteSize(defaults.CACHE_MIN_FREE_BYTES)
    # Docker engine: pulls and pushes at once on one node, across all its worker processes.
    max_parallelism: PositiveInt = defaults.CACHE_MAX_PARALLELISM


class CoordinationSettings(BaseModel):
    """How the workers of a cluster share work through Redis (the broker's, unless ``url``)."""

    enabled: bool = True
    url: SecretStr | None = None
    # How long a blob stays known in the cluster ledger without being seen again.
    ledger_ttl: PositiveInt = defaults.LEDGER_TTL
    # Upload/manifest leases: renewed by their holder, taken over this long after it dies.
    lease_ttl: PositiveFloat = defaults.LEASE_TTL
    # Pause a registry when its RateLimit-Remaining falls below this.
    quota_floor: NonNegativeInt = defaults.QUOTA_FLOOR


class FerrySettings(BaseSettings):
    """Everything configurable, e.g. ``FERRY_BROKER_URL`` or ``FERRY_CACHE__KEEP_BYTES``."""

    model_config = SettingsConfigDict(env_prefix="FERRY_", env_nested_delimiter="__", extra="ignore")

    broker_url: SecretStr | None = None
    result_url: SecretStr | None = None
    targets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    insecure_registries: Annotated[list[str], NoDecode] = Field(default_factory=list)
    engine: EngineName = "registry"
    node: str = Field(default_factory=socket.gethostname)
    concurrency: PositiveInt = 4
    blob_concurrency: PositiveInt = defaults.BLOB_CONCURRENCY
    chunk_size: ByteSize = ByteSize(defaults.CHUNK_SIZE)
    # Source blobs of at least range_threshold bytes are downloaded as this many Range
    # requests at once (0 or 1: one stream per blob).
    range_parallel: NonNegativeInt = defaults.RANGE_PARALLEL
    range_threshold: ByteSize = ByteSize(defaults.RANGE_THRESHOLD)
    # Tags asked for per page when a selector line lists a repository (registries may cap it lower).
    tag_page_size: PositiveInt = 100
    visibility_timeout: PositiveInt = 7200
    # Per registry request: seconds to connect, and seconds without a byte before a read is a stall.
    connect_timeout: PositiveFloat = defaults.CONNECT_TIMEOUT
    read_timeout: PositiveFloat = defaults.READ_TIMEOUT
    result_ttl: PositiveInt = 7 * 24 * 3600
    task_max_retries: NonNegativeInt = 3
    # Seconds before a failed image's task runs again; doubled for each later run.
    task_retry_delay: PositiveFloat = 10.0
    # Copy each image's referrers (signatures, attestations, SBOMs); a list line can opt out too.
    referrers: bool = True
    docker_config: str | None = None
    docker_host: str | None = None
    registries: dict[str, RegistryConfig] = Field(default_factory=dict)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    coordination: CoordinationSettings = Field(default_factory=CoordinationSettings)
    # "max,min" pool processes, scaled by load (Celery's --autoscale); replaces concurrency.
    autoscale: str | None = None
    # How a worker runs its images at once: "prefork" (one process per image in flight; a process
    # that dies takes only its own image down) or "threads" (concurrency images in flight in one
    # process, sharing its connections, tokens and memory).
    pool: Literal["prefork", "threads"] = "prefork"
    # Seconds between the periodic cleanups every node sends itself (0: none).
    cleanup_interval: NonNegativeInt = 600
    # Seconds between checks of the cache filesystem's free space against cache.min_free_bytes.
    disk_check_interval: NonNegativeInt = 15
    # A worker's Prometheus endpoint: off unless a port is given.
    metrics_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    metrics_address: str = "0.0.0.0"
    # Where the worker's processes keep their counts (emptied at start); default: one directory per
    # port under the system's temporary directory.
    metrics_dir: str | None = None
    # What `python -m workers beat` runs: schedules given inline (JSON) and/or in a TOML file.
    schedules: list[Schedule] = Field(default_factory=list)
    schedule_file: str | None = None

    @field_validator("broker_url", "result_url")
    @classmethod
    def _redis_url(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            check_redis_url(v.get_secret_value())
        return v

    @field_validator("autoscale")
    @classmethod
    def _autoscale(cls, v: str | None) -> str | None:
        if v is not None:
            parse_autoscale(v)
        return v

    @field_validator("targets", "insecure_registries", mode="before")
    @classmethod
    def _split_commas(cls, v: object) -> object:
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v


def parse_autoscale(value: str) -> tuple[int, int]:
    """``"max,min"`` (or just ``"max"``) pool processes, as Celery's ``--autoscale`` takes them."""
    parts = [p.strip() for p in value.split(",")]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"must be MAX,MIN process counts, got {value!r}") from None
    if not 1 <= len(nums) <= 2 or any(n < 0 for n in nums) or nums[0] < 1:
        raise ValueError(f"must be MAX,MIN process counts, got {value!r}")
    high, low = nums[0], nums[1] if len(nums) == 2 else 0
    if low > high:
        raise ValueError(f"minimum {low} exceeds maximum {high}")
    return high, low


def check_redis_url(url: str) -> None:
    """Reject a malformed Redis URL with a message that does not echo its password."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"must be a redis://, rediss:// or unix:// URL, not scheme {parts.scheme!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has a malformed port") from None
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError("has no host")
    if port == 0:
        raise ValueError("has port 0")


def describe_validation_error(e: ValidationError) -> str:
    """One line naming the setting (as its environment variable) and what is wrong with it."""
    parts = []
    for err in e.errors():
        loc = "__".join(str(p) for p in err["loc"]).upper()
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"FERRY_{loc}: {msg}")
    return "invalid setting " + "; ".join(parts)
