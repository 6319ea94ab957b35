"""A real distribution (docker-registry 2.8) process per test, on a free port."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.procs import free_port, port_open, stop, wait_until
from tests.support.tls import CertFiles


@dataclass
class Registry:
    root: Path
    port: int = 0
    htpasswd: Path | None = None
    # token auth: (realm URL, service, issuer, rootcertbundle path)
    token: tuple[str, str, str, Path] | None = None
    proxy_remote: str | None = None
    # distribution refuses every DELETE (405 UNSUPPORTED) unless storage.delete.enabled is true.
    delete_enabled: bool = True
    # Where it listens (a non-loopback address of this machine, or of a network namespace).
    address: str = "127.0.0.1"
    # Serve HTTPS with this certificate; with client_cas, require a client certificate signed by one.
    tls: CertFiles | None = None
    client_cas: tuple[Path, ...] = ()
    # What the tests' own reads trust (and present), for a TLS registry.
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)
    # Run through this command prefix (e.g. ``ip netns exec NAME``).
    prefix: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def host(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def config(self) -> str:
        auth = ""
        if self.htpasswd is not None:
            auth = f"""
            auth:
              htpasswd:
                realm: ferry-test
                path: {self.htpasswd}
            """
        elif self.token is not None:
            realm, service, issuer, bundle = self.token
            auth = f"""
            auth:
              token:
                realm: {realm}
                service: {service}
                issuer: {issuer}
                rootcertbundle: {bundle}
            """
        http = f"http:\n  addr: {self.address}:{self.port}\n"
        if self.tls is not None:
            http += f"  tls:\n    certificate: {self.tls.cert}\n    key: {self.tls.key}\n"
            if self.client_cas:
                http += "    clientcas:\n" + "".join(f"      - {ca}\n" for ca in self.client_cas)
        proxy = f"""
            proxy:
              remoteurl: {self.proxy_remote}
            """ if self.proxy_remote else ""
        return textwrap.dedent(f"""
            version: 0.1
            log:
              level: info
              accesslog:
                disabled: false
            storage:
              filesystem:
                rootdirectory: {self.root / "data"}
              delete:
                enabled: {"true" if self.delete_enabled else "false"}
              maintenance:
                uploadpurging:
                  enabled: false
            """) + http + textwrap.dedent(auth) + textwrap.dedent(proxy)

    def start(self) -> Registry:
        if not shutil.which("docker-registry"):
            raise RuntimeError("docker-registry is not installed (apt-get install docker-registry)")
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        cfg = self.root / "config.yml"
        cfg.write_text(self.config())
        with open(self.root / "registry.log", "ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, "docker-registry", "serve", str(cfg)], stdout=log, stderr=log,
                start_new_session=True
            )
        wait_until(self.answers, 15, f"registry on {self.host}")
        return self

    def client(self) -> httpx.Client:
        """A client for the tests' own reads (trusting the registry's CA when it has TLS)."""
        return httpx.Client(verify=self.ssl_context or True, timeout=30)

    def answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"registry exited with {self.proc.returncode}: {self.log()[-2000:]}")
        if not self.prefix:
            return port_open(self.port, self.address)
        with self.client() as c:
            return c.get(f"{self.url}/v2/").status_code in (200, 401)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return (self.root / "registry.log").read_text(errors="replace")

    def failed_handshakes(self) -> list[str]:
        """TLS handshakes it refused (a plain HTTP request, an unknown CA, a missing client certificate);
        a connection closed before any handshake (a port probe) does not count."""
        return [line for line in self.log().splitlines()
                if "TLS handshake error" in line and not line.rstrip().endswith(": EOF")]

    # Direct, unauthenticated reads for assertions (tests only).
    def manifest_digest(self, repo: str, ref: str, client: httpx.Client | None = None) -> str | None:
        accept = ", ".join(
            [
                "application/vnd.oci.image.index.v1+json",
                "application/vnd.oci.image.manifest.v1+json",
                "application/vnd.docker.distribution.manifest.list.v2+json",
                "application/vnd.docker.distribution.manifest.v2+json",
            ]
        )
        if client is None:
            with self.client() as c:
                return self.manifest_digest(repo, ref, c)
        r = client.head(f"{self.url}/v2/{repo}/manifests/{ref}", headers={"Accept": accept})
        if r.status_code == 404:
            return None
        r.raise_for_status()
        return r.headers.get("Docker-Content-Digest")

    def has_blob(self, repo: str, digest: str) -> bool:
        with self.client() as c:
            return c.head(f"{self.url}/v2/{repo}/blobs/{digest}").status_code == 200
