"""Where docker's credentials file is: read by the workers' keychain, checked by the producer
before a standalone run starts its local worker."""

from __future__ import annotations

from pathlib import Path


def docker_config_file(setting: str | None) -> Path | None:
    """The ``config.json`` that ``FERRY_DOCKER_CONFIG`` names: the file itself, or a directory
    holding one (as docker's ``DOCKER_CONFIG``); None when unset (docker's default place).

    A path that is not there is an input error, not "no credentials" followed by 401s."""
    if not setting:
        return None
    path = Path(setting).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"FERRY_DOCKER_CONFIG: the directory {path.parent} holds no config.json")
    elif not path.is_file():
        raise ValueError(f"FERRY_DOCKER_CONFIG: {path} does not exist "
                         "(give docker's config.json, or the directory holding it)")
    return path
