"""A small in-test implementation of the OCI 1.1 referrers API in front of a real docker-registry.

distribution 2.8 has no referrers API, so this front adds one: ``GET /v2/<name>/referrers/<digest>``
is answered from the manifests the registry really stored for that repository (read from its
filesystem storage), every other request is forwarded to the registry unchanged, and a manifest PUT
that carries a ``subject`` gets the ``OCI-Subject`` header a registry with the API sends. Listings
come in pages of ``page_size`` with ``Link`` headers, so clients must follow them.
"""

from __future__ import annotations

import http.server
import json
import threading
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from tests.support.registry import Registry

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}


class ReferrersAPI:
    def __init__(self, registry: Registry, page_size: int = 2) -> None:
        self.registry = registry
        self.page_size = page_size
        self.listings: list[str] = []  # subject digests asked for, in order
        self._client = httpx.Client(base_url=registry.url, timeout=60)
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> ReferrersAPI:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()

    # -- the referrers of a digest, from the registry's storage

    def referrers(self, repo: str, subject: str) -> list[dict[str, Any]]:
        v2 = self.registry.root / "data" / "docker" / "registry" / "v2"
        revisions = v2 / "repositories" / repo / "_manifests" / "revisions" / "sha256"
        found = []
        for rev in sorted(revisions.iterdir()) if revisions.is_dir() else []:
            data = v2 / "blobs" / "sha256" / rev.name[:2] / rev.name / "data"
            raw = data.read_bytes()
            doc = json.loads(raw)
            if (doc.get("subject") or {}).get("digest") != subject:
                continue
            entry = {"mediaType": doc.get("mediaType", ""), "digest": f"sha256:{rev.name}", "size": len(raw),
                     "artifactType": doc.get("artifactType") or doc.get("config", {}).get("mediaType", "")}
            if doc.get("annotations"):
                entry["annotations"] = doc["annotations"]
            found.append(entry)
        return found

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, headers: list[tuple[str, str]], body: bytes,
                      length: str | None = None) -> None:
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                # A HEAD's length is the one the registry gave, not that of the empty body.
                self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _referrers(self, repo: str, subject: str, query: dict[str, list[str]]) -> None:
                api.listings.append(subject)
                found = api.referrers(repo, subject)
                start = int(query.get("page", ["0"])[0])
                page = found[start:start + api.page_size]
                headers = [("Content-Type", OCI_INDEX)]
                if start + api.page_size < len(found):
                    nxt = f"/v2/{repo}/referrers/{subject}?page={start + api.page_size}"
                    headers.append(("Link", f'<{nxt}>; rel="next"'))
                body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": page}).encode()
                self._send(200, headers, body)

            def _forward(self) -> None:
                url = urlsplit(self.path)
                parts = url.path.split("/")
                if self.command == "GET" and len(parts) > 4 and parts[-2] == "referrers":
                    self._referrers("/".join(parts[2:-2]), parts[-1], parse_qs(url.query))
                    return
                body = self._body()
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP | {"host"}}
                r = api._client.request(self.command, self.path, headers=headers, content=body or None)
                out = [(k, v.replace(api.registry.url, api.url)) for k, v in r.headers.items()
                       if k.lower() not in _HOP]
                if self.command == "PUT" and "/manifests/" in url.path and r.status_code == 201:
                    subject = (json.loads(body).get("subject") or {}).get("digest")
                    if subject:
                        out.append(("OCI-Subject", subject))
                self._send(r.status_code, out, r.content, r.headers.get("Content-Length"))

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _forward

        return Handler


def referrers_api(registry: Registry, page_size: int = 2) -> ReferrersAPI:
    return ReferrersAPI(registry, page_size).start()
