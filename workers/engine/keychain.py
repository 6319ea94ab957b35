"""Where registry credentials come from: keychains over ferry's settings and docker's config.

A keychain answers "which credential for this registry?"; registries are compared by
``canonical_registry``, so Docker Hub's many names find one entry. Secrets never appear
in reprs, logs or exception messages.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from config.reference import DOCKER_HUB, canonical_registry
from workers.engine.errors import Unauthorized

# Where docker keeps Docker Hub credentials (config.json keys, credential helpers).
DOCKER_HUB_SERVER_URL = "https://index.docker.io/v1/"
_HELPER_TIMEOUT = 60.0


@dataclass(frozen=True, repr=False)
class Credential:
    """What to present to a registry: a username/password, an identity token, or a bearer token.

    ``identity_token`` is an OAuth2 refresh token (docker's ``identitytoken``);
    ``registry_token`` is a bearer token sent to the registry as is.
    """

    username: str | None = None
    password: str | None = None
    identity_token: str | None = None
    registry_token: str | None = None

    @property
    def has_basic(self) -> bool:
        return bool(self.username) and self.password is not None

    def __repr__(self) -> str:
        secrets = [
            n for n in ("password", "identity_token", "registry_token") if getattr(self, n) is not None
        ]
        return f"Credential(username={self.username!r}, secrets={secrets})"

    __str__ = __repr__


class Keychain(Protocol):
    """Finds the credential for a registry (``docker.io`` or ``host[:port]``), or None."""

    def resolve(self, registry: str) -> Credential | None: ...


class AnonymousKeychain:
    """No credentials anywhere."""

    def resolve(self, registry: str) -> Credential | None:
        return None


class StaticKeychain:
    """A fixed mapping, e.g. built from ferry's settings at an entry point."""

    def __init__(self, mapping: Mapping[str, Credential]) -> None:
        self._creds = {canonical_registry(k): v for k, v in mapping.items()}

    def resolve(self, registry: str) -> Credential | None:
        return self._creds.get(canonical_registry(registry))

    def __repr__(self) -> str:
        return f"StaticKeychain(registries={sorted(self._creds)})"


class RotatingKeychain:
    """Several credentials for a registry, one in use at a time: ``choose(registry)`` says which
    (the cluster moves on when one's pull quota is spent). ``generation`` lets RegistryAuth
    notice a switch and drop the tokens of the old credential."""

    def __init__(self, credentials: Mapping[str, Sequence[Credential]], choose: Callable[[str], int]) -> None:
        self._creds = {canonical_registry(k): list(v) for k, v in credentials.items() if v}
        self._choose = choose

    def generation(self, registry: str) -> int:
        reg = canonical_registry(registry)
        return self._choose(reg) % len(self._creds[reg]) if reg in self._creds else 0

    def resolve(self, registry: str) -> Credential | None:
        reg = canonical_registry(registry)
        creds = self._creds.get(reg)
        return creds[self.generation(reg)] if creds else None

    def __repr__(self) -> str:
        return f"RotatingKeychain(registries={sorted(self._creds)})"


class ChainKeychain:
    """Asks each keychain in turn; the first credential found wins."""

    def __init__(self, *keychains: Keychain) -> None:
        self._keychains = keychains

    def resolve(self, registry: str) -> Credential | None:
        for kc in self._keychains:
            cred = kc.resolve(registry)
            if cred is not None:
                return cred
        return None

    def generation(self, registry: str) -> int:
        return sum(generation_of(kc, registry) for kc in self._keychains)


def generation_of(keychain: Keychain, registry: str) -> int:
    """Changes when ``keychain`` starts answering with another credential (rotation)."""
    gen = getattr(keychain, "generation", None)
    return int(gen(registry)) if callable(gen) else 0


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


def default_docker_config() -> Path:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json`` (docker's own rule)."""
    base = os.environ.get("DOCKER_CONFIG")
    return (Path(base) if base else Path.home() / ".docker") / "config.json"


class DockerConfigKeychain:
    """Credentials from docker's ``config.json``, as ``docker login`` leaves them.

    Order: a ``credHelpers`` entry for the registry, then an ``auths`` entry that
    holds credentials, then the ``credsStore`` default helper.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else default_docker_config()
        self._lock = threading.Lock()
        self._doc: dict[str, object] | None = None
        # Helper answers are cached: running a helper per request would be slow.
        self._helper_cache: dict[str, Credential | None] = {}

    def __repr__(self) -> str:
        return f"DockerConfigKeychain(path={str(self.path)!r})"

    def resolve(self, registry: str) -> Credential | None:
        registry = canonical_registry(registry)
        doc = self._load()
        helpers = doc.get("credHelpers")
        if isinstance(helpers, dict):
            for key, helper in helpers.items():
                if isinstance(helper, str) and helper and canonical_registry(key) == registry:
                    return self._from_helper(helper, registry)
        auths = doc.get("auths")
        if isinstance(auths, dict):
            for key, entry in auths.items():
                if canonical_registry(key) == registry and isinstance(entry, dict):
                    cred = _from_auth_entry(entry, registry, self.path)
                    if cred is not None:
                        return cred
        store = doc.get("credsStore")
        if isinstance(store, str) and store:
            return self._from_helper(store, registry)
        return None

    def _load(self) -> dict[str, object]:
        with self._lock:
            if self._doc is None:
                try:
                    raw = self.path.read_text(encoding="utf-8")
                except FileNotFoundError:
                    raw = "{}"
                except OSError as e:
                    raise Unauthorized(f"cannot read docker config {self.path}: {e.strerror}") from None
                try:
                    doc = json.loads(raw) if raw.strip() else {}
                except ValueError as e:
                    # The decoder's message names a position, never the content.
                    raise Unauthorized(f"docker config {self.path} is not valid JSON: {e}") from None
                if not isinstance(doc, dict):
                    raise Unauthorized(f"docker config {self.path} is not a JSON object")
                self._doc = doc
            return self._doc

    def _from_helper(self, helper: str, registry: str) -> Credential | None:
        key = f"{helper}\0{registry}"
        with self._lock:
            if key in self._helper_cache:
                return self._helper_cache[key]
        cred = run_credential_helper(helper, registry)
        with self._lock:
            self._helper_cache[key] = cred
        return cred


def _from_auth_entry(entry: Mapping[str, object], registry: str, path: Path) -> Credential | None:
    def text(name: str) -> str | None:
        v = entry.get(name)
        return v if isinstance(v, str) and v else None

    username, password = text("username"), text("password")
    encoded = text("auth")
    if encoded:
        try:
            decoded = base64.b64decode(encoded, validate=False).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise Unauthorized(f"docker config {path}: the auth entry for {registry} is not base64") from None
        user, sep, pw = decoded.partition(":")
        if not sep:
            raise Unauthorized(f"docker config {path}: the auth entry for {registry} is not user:password")
        username, password = user, pw
    identity, registry_token = text("identitytoken"), text("registrytoken")
    if identity:
        return Credential(username=username, identity_token=identity)
    if registry_token:
        return Credential(registry_token=registry_token)
    if username and password is not None:
        return Credential(username=username, password=password)
    return None


def run_credential_helper(helper: str, registry: str) -> Credential | None:
    """Ask ``docker-credential-<helper> get`` for a registry's credential.

    The helper reads the server URL on stdin and prints ``{"Username", "Secret"}``;
    a Username of ``<token>`` means the Secret is an identity token.
    """
    server = DOCKER_HUB_SERVER_URL if canonical_registry(registry) == DOCKER_HUB else registry
    program = f"docker-credential-{helper}"
    try:
        proc = subprocess.run(
            [program, "get"],
            input=server.encode(),
            capture_output=True,
            timeout=_HELPER_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise Unauthorized(f"credential helper {program} for {registry} is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise Unauthorized(
            f"credential helper {program} for {registry} timed out", temporary=True
        ) from None
    if proc.returncode != 0:
        said = (proc.stdout + proc.stderr).decode("utf-8", "replace")
        if "credentials not found" in said.lower():
            return None
        # Helpers print short error messages, not secrets; keep the first line only.
        first = said.strip().splitlines()[0][:200] if said.strip() else f"exit status {proc.returncode}"
        raise Unauthorized(f"credential helper {program} failed for {registry}: {first}")
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        raise Unauthorized(f"credential helper {program} gave unreadable output for {registry}") from None
    if not isinstance(doc, dict):
        raise Unauthorized(f"credential helper {program} gave unreadable output for {registry}")
    username, secret = doc.get("Username"), doc.get("Secret")
    if not isinstance(secret, str) or not secret:
        return None
    if username == "<token>":
        return Credential(identity_token=secret)
    return Credential(username=username if isinstance(username, str) else None, password=secret)


def configured_keychain(
    configured: Mapping[str, Sequence[Credential]],
    docker_config: Path | None,
    choose: Callable[[str], int] = lambda registry: 0,
) -> Keychain:
    """ferry's own credentials per registry first, then docker's config (``None``: its default place).

    A registry with several credentials rotates among them: ``choose(registry)`` picks one
    (the cluster's rotation).
    """
    rotating = {h: list(c) for h, c in configured.items() if len(c) > 1}
    single = {h: c[0] for h, c in configured.items() if len(c) == 1}
    return ChainKeychain(RotatingKeychain(rotating, choose), StaticKeychain(single),
                         DockerConfigKeychain(docker_config))
