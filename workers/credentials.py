"""Where a worker's registry credentials come from: ferry's settings first, then docker's config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from config.settings import FerrySettings, RegistryConfig
from workers.engine.auth import (
    ChainKeychain,
    Credential,
    DockerConfigKeychain,
    Keychain,
    RotatingKeychain,
    StaticKeychain,
)


def _credentials(r: RegistryConfig) -> list[Credential]:
    found = []
    if r.username or r.password:
        found.append(Credential(username=r.username, password=r.password.get_secret_value() if r.password else None))
    found += [Credential(username=u, password=p.get_secret_value()) for u, p in r.extra_credentials]
    return found


def keychain_from_settings(s: FerrySettings, choose: Callable[[str], int] = lambda registry: 0) -> Keychain:
    """``choose(registry)`` picks among a registry's several credentials (the cluster's rotation)."""
    configured = {host: creds for host, r in s.registries.items() if (creds := _credentials(r))}
    rotating = {h: c for h, c in configured.items() if len(c) > 1}
    single = {h: c[0] for h, c in configured.items() if len(c) == 1}
    docker_cfg = Path(s.docker_config).expanduser() if s.docker_config else None
    return ChainKeychain(RotatingKeychain(rotating, choose), StaticKeychain(single), DockerConfigKeychain(docker_cfg))
