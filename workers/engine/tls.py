"""TLS to registries: which scheme a registry is spoken to with, and one client context per
distinct TLS configuration.

Building a context loads a CA bundle (tens of milliseconds of CPU); every registry client,
token client and worker process would otherwise pay it again, so contexts are cached for the
life of the process (and built before the worker's pool forks).

The rules, in order, for a registry host:

1. ``insecure`` (``FERRY_INSECURE_REGISTRIES`` or ``insecure`` in ``FERRY_REGISTRIES``): HTTPS
   without verifying the certificate, and plain HTTP when the server does not speak TLS (as
   docker's insecure-registries);
2. ``ca_file`` or ``client_cert`` given: HTTPS, verified against the default CAs plus ``ca_file``,
   presenting the client certificate;
3. loopback (``localhost``, 127.0.0.0/8, ``::1``): plain HTTP;
4. anything else: HTTPS verified against the default CAs.
"""

from __future__ import annotations

import enum
import ssl
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import httpx

from config.reference import canonical_registry, host_is_loopback


@dataclass(frozen=True)
class TlsConfig:
    """How to speak TLS to one registry (paths as given in the settings)."""

    ca_file: str | None = None
    client_cert: str | None = None
    # None: the key is in client_cert's file.
    client_key: str | None = None
    insecure: bool = False

    @property
    def files_given(self) -> bool:
        return bool(self.ca_file or self.client_cert)


class Scheme(enum.Enum):
    HTTPS = "https"
    HTTP = "http"
    # HTTPS without verification, HTTP when the server does not speak TLS.
    HTTPS_OR_HTTP = "https-or-http"


_DEFAULT = TlsConfig()
_lock = threading.Lock()
_contexts: dict[TlsConfig, ssl.SSLContext] = {}


def client_context(config: TlsConfig | None = None) -> ssl.SSLContext:
    """The shared context for ``config`` (default: verify against the default CAs).

    Raises ``ValueError`` naming the file when a CA bundle, certificate or key cannot be used."""
    config = config or _DEFAULT
    with _lock:
        ctx = _contexts.get(config)
        if ctx is None:
            ctx = _contexts[config] = _build(config)
        return ctx


def _build(config: TlsConfig) -> ssl.SSLContext:
    ctx = httpx.create_ssl_context(verify=True)
    if config.ca_file:
        # ssl.SSLError is an OSError: caught first.
        try:
            ctx.load_verify_locations(cafile=config.ca_file)
        except ssl.SSLError as e:
            raise ValueError(f"ca_file {config.ca_file} holds no usable PEM certificate ({e.reason or e})") from None
        except OSError as e:
            raise ValueError(f"cannot read ca_file {config.ca_file}: {e.strerror or e}") from None
    if config.client_cert:
        # Opened one by one first, so the message names the file that is missing.
        for name, path in (("client_cert", config.client_cert), ("client_key", config.client_key)):
            if path:
                try:
                    open(path, "rb").close()
                except OSError as e:
                    raise ValueError(f"cannot read {name} {path}: {e.strerror or e}") from None
        try:
            ctx.load_cert_chain(config.client_cert, config.client_key)
        except ssl.SSLError as e:
            key = f"client_key {config.client_key}" if config.client_key else "its key"
            raise ValueError(f"client_cert {config.client_cert} and {key} do not make a usable "
                             f"certificate chain ({e.reason or e})") from None
        except OSError as e:
            where = f"client_cert {config.client_cert}" + (f" / client_key {config.client_key}"
                                                            if config.client_key else "")
            raise ValueError(f"cannot read {where}: {e.strerror or e}") from None
    if config.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class TlsPolicy:
    """Decides, per registry host, the scheme and the client context (one place for both)."""

    def __init__(self, configs: Mapping[str, TlsConfig] | None = None, insecure: Iterable[str] = ()) -> None:
        self.configs = {canonical_registry(h): c for h, c in (configs or {}).items()}
        listed = {canonical_registry(h) for h in insecure}
        for host in listed:
            self.configs[host] = _with_insecure(self.configs.get(host))

    def config(self, host: str) -> TlsConfig:
        return self.configs.get(canonical_registry(host), _DEFAULT)

    def scheme(self, host: str) -> Scheme:
        config = self.config(host)
        if config.insecure:
            return Scheme.HTTPS_OR_HTTP
        if config.files_given or not host_is_loopback(host):
            return Scheme.HTTPS
        return Scheme.HTTP

    def context(self, host: str) -> ssl.SSLContext:
        """The context for HTTPS to ``host``: its own settings when it has any, else the default.
        Token realms on another host than their registry are looked up the same way."""
        return client_context(self.config(host))

    def check(self) -> None:
        """Build every configured context now: a missing or unusable file is reported at start,
        naming the registry."""
        for host, config in sorted(self.configs.items()):
            try:
                client_context(config)
            except ValueError as e:
                raise ValueError(f"FERRY_REGISTRIES: registry {host}: {e}") from None


def _with_insecure(config: TlsConfig | None) -> TlsConfig:
    c = config or _DEFAULT
    return TlsConfig(c.ca_file, c.client_cert, c.client_key, insecure=True)
