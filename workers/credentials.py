"""Where a worker's registry credentials come from: ferry's settings first, then docker's config."""

from __future__ import annotations

from pathlib import Path

from config.settings import FerrySettings
from workers.engine.auth import ChainKeychain, Credential, DockerConfigKeychain, Keychain, StaticKeychain


def keychain_from_settings(s: FerrySettings) -> Keychain:
    static = {
        host: Credential(username=r.username, password=r.password.get_secret_value() if r.password else None)
        for host, r in s.registries.items()
        if r.username or r.password
    }
    docker_cfg = Path(s.docker_config).expanduser() if s.docker_config else None
    return ChainKeychain(StaticKeychain(static), DockerConfigKeychain(docker_cfg))
