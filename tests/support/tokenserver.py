"""A real docker token server (https://distribution.github.io/distribution/spec/auth/token/).

Serves ``GET /token`` (basic auth or anonymous) and the OAuth2 ``POST /token``
(``refresh_token`` and ``password`` grants), grants the requested scopes allowed by
a per-user ACL, signs ES256 JWTs that distribution 2.8 verifies through an ``x5c``
chain against its ``rootcertbundle``, and records every request it answers.
"""

from __future__ import annotations

import base64
import datetime as dt
import fnmatch
import json
import secrets
import ssl
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# user -> {repository glob: actions}; None is the anonymous user; "*" grants every action.
Acl = Mapping[str | None, Mapping[str, Iterable[str]]]


@dataclass(frozen=True)
class SeenRequest:
    method: str
    grant: str  # "basic", "anonymous", "refresh_token", "password", or "rejected"
    user: str | None
    service: str | None
    scopes: tuple[str, ...]
    status: int
    client_id: str | None = None


@dataclass
class TokenServer:
    root: Path
    users: Mapping[str, str] = field(default_factory=dict)
    acl: Acl = field(default_factory=dict)
    # refresh (identity) token -> user
    refresh_tokens: Mapping[str, str] = field(default_factory=dict)
    expires_in: int = 300
    # False: answer the OAuth2 POST with 405, like token services that only know GET.
    oauth: bool = True
    service: str = "ferry-test-registry"
    issuer: str = "ferry-test-issuer"
    port: int = 0
    # Serve HTTPS with this server context (a certificate from a private CA).
    tls: ssl.SSLContext | None = field(default=None, repr=False)
    _seen: list[SeenRequest] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _server: ThreadingHTTPServer | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ferry test token signer")])
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, content_commitment=False,
                    key_encipherment=False, data_encipherment=False, key_agreement=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.bundle = self.root / "token-signer.pem"
        self.bundle.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()

    # lifecycle ------------------------------------------------------------------

    def start(self) -> TokenServer:
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        server.daemon_threads = True
        if self.tls is not None:
            server.socket = self.tls.wrap_socket(server.socket, server_side=True)
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="token-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def realm(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/token"

    @property
    def registry_token(self) -> tuple[str, str, str, Path]:
        """What ``Registry(token=...)`` needs: (realm, service, issuer, rootcertbundle)."""
        return (self.realm, self.service, self.issuer, self.bundle)

    # what it saw --------------------------------------------------------------------

    @property
    def seen(self) -> list[SeenRequest]:
        with self._lock:
            return list(self._seen)

    def issued(self) -> list[SeenRequest]:
        """Requests that got a token."""
        return [r for r in self.seen if r.status == 200]

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()

    def _record(self, r: SeenRequest) -> None:
        with self._lock:
            self._seen.append(r)

    # the protocol ---------------------------------------------------------------------

    def granted(self, user: str | None, scopes: Iterable[str]) -> list[dict[str, object]]:
        rules = self.acl.get(user, {})
        access: list[dict[str, object]] = []
        for scope in scopes:
            for item in scope.split():
                kind, _, rest = item.partition(":")
                name, _, actions = rest.rpartition(":")
                if kind != "repository" or not name:
                    continue
                allowed: set[str] = set()
                for pattern, acts in rules.items():
                    if fnmatch.fnmatchcase(name, pattern):
                        allowed.update(acts)
                wanted = [a for a in actions.split(",") if a]
                got = wanted if "*" in allowed else [a for a in wanted if a in allowed]
                if got:
                    access.append({"type": kind, "name": name, "actions": got})
        return access

    def sign(self, user: str | None, service: str, access: list[dict[str, object]]) -> str:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": service,
            "exp": now + self.expires_in,
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"x5c": [self._x5c]})


def _handler(ts: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet: tests assert on ts.seen instead

        def _reply(self, status: int, doc: Mapping[str, object]) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if status == 401:
                self.send_header("WWW-Authenticate", 'Basic realm="ferry-test-token"')
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path != "/token":
                self._reply(404, {"error": "not found"})
                return
            q = parse_qs(url.query)
            service = q.get("service", [""])[0]
            scopes = tuple(q.get("scope", []))
            user: str | None = None
            grant = "anonymous"
            header = self.headers.get("Authorization", "")
            if header.lower().startswith("basic "):
                try:
                    name, _, password = base64.b64decode(header[6:]).decode().partition(":")
                except ValueError:
                    name, password = "", ""
                # A user's refresh token also works as its password (GCR-style GET fallback).
                if not name or (ts.users.get(name) != password and ts.refresh_tokens.get(password) != name):
                    ts._record(SeenRequest("GET", "rejected", name or None, service, scopes, 401))
                    self._reply(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
                    return
                user, grant = name, "basic"
            token = ts.sign(user, service, ts.granted(user, scopes))
            ts._record(SeenRequest("GET", grant, user, service, scopes, 200))
            self._reply(200, {"token": token, "access_token": token, "expires_in": ts.expires_in,
                              "issued_at": dt.datetime.now(dt.UTC).isoformat()})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
            if urlsplit(self.path).path != "/token":
                self._reply(404, {"error": "not found"})
                return
            service = form.get("service", "")
            scopes = tuple(form.get("scope", "").split())
            grant = form.get("grant_type", "")
            client_id = form.get("client_id")
            if not ts.oauth:
                ts._record(SeenRequest("POST", grant, None, service, scopes, 405, client_id))
                self._reply(405, {"error": "unsupported"})
                return
            user: str | None = None
            if grant == "refresh_token":
                user = ts.refresh_tokens.get(form.get("refresh_token", ""))
            elif grant == "password":
                name = form.get("username", "")
                user = name if name and ts.users.get(name) == form.get("password") else None
            if user is None:
                ts._record(SeenRequest("POST", grant, None, service, scopes, 401, client_id))
                self._reply(401, {"error": "invalid_grant"})
                return
            token = ts.sign(user, service, ts.granted(user, scopes))
            ts._record(SeenRequest("POST", grant, user, service, scopes, 200, client_id))
            self._reply(200, {"access_token": token, "expires_in": ts.expires_in,
                              "scope": " ".join(scopes)})

    return Handler
