"""A real distribution (docker-registry 2.8) process per test, on a free port."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.procs import free_port, port_open, stop, wait_until


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
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

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
            http:
              addr: 127.0.0.1:{self.port}
            """) + textwrap.dedent(auth) + textwrap.dedent(proxy)

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
                ["docker-registry", "serve", str(cfg)], stdout=log, stderr=log, start_new_session=True
            )
        wait_until(lambda: port_open(self.port), 15, f"registry on {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return (self.root / "registry.log").read_text(errors="replace")

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
        r = httpx.head(f"{self.url}/v2/{repo}/manifests/{ref}", headers={"Accept": accept})
        if r.status_code == 404:
            return None
        r.raise_for_status()
        return r.headers.get("Docker-Content-Digest")

    def has_blob(self, repo: str, digest: str) -> bool:
        return httpx.head(f"{self.url}/v2/{repo}/blobs/{digest}").status_code == 200
