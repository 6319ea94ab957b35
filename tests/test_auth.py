"""Registry authentication against real registries: anonymous, htpasswd basic, and token auth."""

from __future__ import annotations

import base64
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from config.reference import canonical_registry
from config.settings import FerrySettings
from tests.support.htpasswd import write_htpasswd
from tests.support.images import Image, Pusher, push_image, sha
from tests.support.registry import Registry
from tests.support.tokenserver import TokenServer
from workers.engine.auth import RegistryAuth
from workers.engine.challenges import parse_challenges, scope_for_request
from workers.engine.errors import Denied, Unauthorized
from workers.engine.keychain import (
    AnonymousKeychain,
    ChainKeychain,
    Credential,
    DockerConfigKeychain,
    Keychain,
    StaticKeychain,
    docker_config_file,
)
from workers.runtime import build_keychain

ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
USERS = {"alice": "alice-pw-1", "admin": "admin-pw-2"}
ACL = {
    "alice": {"team/readonly": ["pull"], "team/rw": ["pull", "push"]},
    "admin": {"*": ["*"]},
    None: {"public/*": ["pull"]},
}
REFRESH = {"idtok-alice-3": "alice"}


def cred(user: str) -> Credential:
    return Credential(username=user, password=USERS[user])


def client_for(reg: Registry, keychain: Keychain, **kw: object) -> httpx.Client:
    return httpx.Client(auth=RegistryAuth(reg.host, keychain), timeout=30, **kw)  # type: ignore[arg-type]


def push_blob(c: httpx.Client, reg: Registry, repo: str, data: bytes) -> httpx.Response:
    """POST to start the upload (earns the push token), then PUT the content."""
    r = c.post(f"{reg.url}/v2/{repo}/blobs/uploads/")
    assert r.status_code == 202, r.text
    loc = httpx.URL(reg.url).join(r.headers["Location"])
    return c.put(loc.copy_merge_params({"digest": sha(data)}), content=data,
                 headers={"Content-Type": "application/octet-stream"})


def get_manifest(c: httpx.Client, reg: Registry, img: Image) -> httpx.Response:
    return c.get(f"{reg.url}/v2/{img.repo}/manifests/{img.tag}", headers={"Accept": ACCEPT})


# --------------------------------------------------------------------------- fixtures


@dataclass
class TokenSetup:
    ts: TokenServer
    reg: Registry
    readonly: Image
    public: Image


@pytest.fixture
def make_token_setup(
    tmp_path: Path, make_registry: Callable[..., Registry]
) -> Iterator[Callable[..., TokenSetup]]:
    servers: list[TokenServer] = []

    def make(**kw: object) -> TokenSetup:
        ts = TokenServer(tmp_path / f"token-{len(servers)}", users=USERS, acl=ACL, refresh_tokens=REFRESH,
                         **kw).start()  # type: ignore[arg-type]
        servers.append(ts)
        reg = make_registry("tok", token=ts.registry_token)
        with httpx.Client(auth=RegistryAuth(reg.host, StaticKeychain({reg.host: cred("admin")})),
                          timeout=30) as admin:
            pusher = Pusher(reg.url, client=admin)
            readonly = push_image(pusher, "team/readonly", "v1", salt="ro")
            public = push_image(pusher, "public/app", "v1", salt="pub")
        ts.clear()
        return TokenSetup(ts, reg, readonly, public)

    yield make
    for ts in servers:
        ts.stop()


@pytest.fixture
def tok(make_token_setup: Callable[..., TokenSetup]) -> TokenSetup:
    return make_token_setup()


def scopes_issued(ts: TokenServer) -> list[tuple[str, ...]]:
    return [r.scopes for r in ts.issued()]


# --------------------------------------------------------------------------- anonymous


def test_anonymous_pull_from_open_registry(src: Registry, src_pusher: Pusher) -> None:
    img = push_image(src_pusher, "library/busy", "v1")
    with client_for(src, AnonymousKeychain()) as c:
        r = get_manifest(c, src, img)
        assert r.status_code == 200
        assert r.headers["Docker-Content-Digest"] == img.digest
        assert "Authorization" not in r.request.headers
        assert r.history == []
        blob = c.get(f"{src.url}/v2/{img.repo}/blobs/{img.blobs[0]}")
        assert blob.status_code == 200 and sha(blob.content) == img.blobs[0]


def test_anonymous_token_for_public_repo_and_refusal_for_private(tok: TokenSetup) -> None:
    with client_for(tok.reg, AnonymousKeychain()) as c:
        r = get_manifest(c, tok.reg, tok.public)
        assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == tok.public.digest
        [seen] = tok.ts.issued()
        assert (seen.grant, seen.scopes) == ("anonymous", ("repository:public/app:pull",))
        with pytest.raises(Unauthorized, match="requires credentials") as e:
            get_manifest(c, tok.reg, tok.readonly)
        assert "team/readonly" in str(e.value)


# --------------------------------------------------------------------------- basic (htpasswd)


@pytest.fixture
def basic_reg(tmp_path: Path, make_registry: Callable[..., Registry]) -> Registry:
    return make_registry("basic", htpasswd=write_htpasswd(tmp_path / "htpasswd", {"bob": "bob-pw-4"}))


def test_basic_auth_right_credentials_push_and_pull(basic_reg: Registry) -> None:
    kc = StaticKeychain({basic_reg.host: Credential(username="bob", password="bob-pw-4")})
    data = b"basic-auth blob"
    with client_for(basic_reg, kc) as c:
        first = c.get(f"{basic_reg.url}/v2/")
        assert first.status_code == 200
        assert [h.status_code for h in first.history] == [401]
        r = push_blob(c, basic_reg, "bob/app", data)
        assert r.status_code == 201, r.text
        head = c.head(f"{basic_reg.url}/v2/bob/app/blobs/{sha(data)}")
        assert head.status_code == 200
        # Once the registry asked for Basic, credentials go upfront: no more 401 round trips.
        assert head.history == [] and head.request.headers["Authorization"].startswith("Basic ")
    assert httpx.head(f"{basic_reg.url}/v2/bob/app/blobs/{sha(data)}").status_code == 401


def test_basic_auth_wrong_credentials_is_a_permanent_error(basic_reg: Registry) -> None:
    kc = StaticKeychain({basic_reg.host: Credential(username="bob", password="not-the-pw-5")})
    with client_for(basic_reg, kc) as c, pytest.raises(Unauthorized) as e:
        c.get(f"{basic_reg.url}/v2/bob/app/tags/list")
    assert "rejected the credentials of user 'bob'" in str(e.value)
    assert basic_reg.host in str(e.value)
    assert "not-the-pw-5" not in str(e.value) and not e.value.temporary


def test_basic_auth_without_credentials(basic_reg: Registry) -> None:
    with client_for(basic_reg, AnonymousKeychain()) as c, pytest.raises(Unauthorized) as e:
        c.get(f"{basic_reg.url}/v2/bob/app/tags/list")
    assert str(e.value) == f"registry {basic_reg.host} requires credentials"


# --------------------------------------------------------------------------- bearer tokens


def test_token_pull_only_and_pull_push_repositories(tok: TokenSetup) -> None:
    kc = StaticKeychain({tok.reg.host: cred("alice")})
    data = b"alice writes here"
    with client_for(tok.reg, kc) as c:
        r = get_manifest(c, tok.reg, tok.readonly)
        assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == tok.readonly.digest
        assert r.request.headers["Authorization"].startswith("Bearer ")

        with pytest.raises(Denied) as e:
            c.post(f"{tok.reg.url}/v2/team/readonly/blobs/uploads/")
        assert "repository:team/readonly:pull,push" in str(e.value) and "alice" in str(e.value)

        r = push_blob(c, tok.reg, "team/rw", data)
        assert r.status_code == 201, r.text
        assert c.head(f"{tok.reg.url}/v2/team/rw/blobs/{sha(data)}").status_code == 200

    seen = tok.ts.issued()
    assert {s.user for s in seen} == {"alice"} and {s.grant for s in seen} == {"basic"}
    assert {s.service for s in seen} == {tok.ts.service}
    assert ("repository:team/readonly:pull",) in scopes_issued(tok.ts)
    assert ("repository:team/rw:pull,push",) in scopes_issued(tok.ts)


def test_cross_repository_mount_asks_for_both_scopes(tok: TokenSetup) -> None:
    kc = StaticKeychain({tok.reg.host: cred("alice")})
    layer = tok.readonly.blobs[-1]
    with client_for(tok.reg, kc) as c:
        r = c.post(f"{tok.reg.url}/v2/team/rw/blobs/uploads/", params={"mount": layer, "from": "team/readonly"})
        assert r.status_code == 201, r.text  # mounted, not a new upload
        assert r.headers["Docker-Content-Digest"] == layer
        assert c.head(f"{tok.reg.url}/v2/team/rw/blobs/{layer}").status_code == 200
    assert scopes_issued(tok.ts)[0] == ("repository:team/readonly:pull", "repository:team/rw:pull,push")


def test_tokens_are_cached_per_scope(tok: TokenSetup) -> None:
    kc = StaticKeychain({tok.reg.host: cred("alice")})
    with client_for(tok.reg, kc) as c:
        for _ in range(5):
            assert get_manifest(c, tok.reg, tok.readonly).status_code == 200
            for b in tok.readonly.blobs:
                assert c.head(f"{tok.reg.url}/v2/team/readonly/blobs/{b}").status_code == 200
        pushes = [push_blob(c, tok.reg, "team/rw", f"cached {i}".encode()) for i in range(3)]
        assert all(p.status_code == 201 for p in pushes)
        # The realm is known after the first challenge: the push token was fetched before asking.
        assert all(p.history == [] for p in pushes)
        # A pull on rw is covered by the pull,push token already held.
        assert c.head(f"{tok.reg.url}/v2/team/rw/blobs/{sha(b'cached 0')}").status_code == 200
    assert scopes_issued(tok.ts) == [("repository:team/readonly:pull",), ("repository:team/rw:pull,push",)]


def test_tokens_are_refreshed_after_expiry(make_token_setup: Callable[..., TokenSetup]) -> None:
    tok = make_token_setup(expires_in=2)
    kc = StaticKeychain({tok.reg.host: cred("alice")})
    with client_for(tok.reg, kc) as c:
        assert get_manifest(c, tok.reg, tok.readonly).status_code == 200
        time.sleep(0.8)
        assert get_manifest(c, tok.reg, tok.readonly).status_code == 200
        assert len(tok.ts.issued()) == 1
        time.sleep(1.5)  # past expires_in minus the safety margin
        r = get_manifest(c, tok.reg, tok.readonly)
        assert r.status_code == 200 and r.history == []
    assert len(tok.ts.issued()) == 2


def test_concurrent_requests_fetch_one_token(tok: TokenSetup) -> None:
    kc = StaticKeychain({tok.reg.host: cred("alice")})
    start = threading.Barrier(20)
    statuses: list[int] = []
    lock = threading.Lock()

    def worker(c: httpx.Client) -> None:
        start.wait(10)
        got = [get_manifest(c, tok.reg, tok.readonly).status_code]
        got += [c.head(f"{tok.reg.url}/v2/team/readonly/blobs/{b}").status_code for b in tok.readonly.blobs]
        with lock:
            statuses.extend(got)

    with client_for(tok.reg, kc) as c:
        threads = [threading.Thread(target=worker, args=(c,)) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert statuses == [200] * (20 * (1 + len(tok.readonly.blobs)))
    assert len(tok.ts.seen) == 1


def test_streamed_upload_after_post_reuses_the_push_token(tok: TokenSetup) -> None:
    kc = StaticKeychain({tok.reg.host: cred("alice")})
    chunks = [b"a" * 70000, b"b" * 50000]
    data = b"".join(chunks)
    with client_for(tok.reg, kc) as c:
        r = c.post(f"{tok.reg.url}/v2/team/rw/blobs/uploads/")
        assert r.status_code == 202
        loc = httpx.URL(tok.reg.url).join(r.headers["Location"])
        r = c.patch(loc, content=iter(chunks), headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 202 and r.history == []
        loc = httpx.URL(tok.reg.url).join(r.headers["Location"])
        r = c.put(loc.copy_merge_params({"digest": sha(data)}))
        assert r.status_code == 201, r.text
    assert len(tok.ts.issued()) == 1


def test_streamed_body_meeting_a_challenge_fails_temporarily(tok: TokenSetup) -> None:
    kc = StaticKeychain({tok.reg.host: cred("alice")})
    with client_for(tok.reg, kc) as c:
        with pytest.raises(Unauthorized, match="streamed upload") as e:
            c.put(f"{tok.reg.url}/v2/team/rw/blobs/uploads/never-started", content=iter([b"spent"]))
        assert e.value.temporary  # restarting the upload succeeds: the token is now cached
        r = c.post(f"{tok.reg.url}/v2/team/rw/blobs/uploads/")
        assert r.status_code == 202 and r.history == []
    assert scopes_issued(tok.ts) == [("repository:team/rw:pull,push",)]


# --------------------------------------------------------------------------- docker config


def write_config(d: Path, doc: dict[str, object]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(doc))
    return d / "config.json"


def test_docker_config_auth_entry_keyed_by_url(tok: TokenSetup, tmp_path: Path) -> None:
    auth = base64.b64encode(f"alice:{USERS['alice']}".encode()).decode()
    path = write_config(tmp_path / "dc", {"auths": {f"http://{tok.reg.host}/v2/": {"auth": auth}}})
    with client_for(tok.reg, DockerConfigKeychain(path)) as c:
        assert get_manifest(c, tok.reg, tok.readonly).status_code == 200
    [seen] = tok.ts.issued()
    assert (seen.grant, seen.user) == ("basic", "alice")


def test_docker_config_identity_token_uses_refresh_grant(tok: TokenSetup, tmp_path: Path) -> None:
    path = write_config(tmp_path / "dc", {"auths": {tok.reg.host: {"identitytoken": "idtok-alice-3"}}})
    with client_for(tok.reg, DockerConfigKeychain(path)) as c:
        assert get_manifest(c, tok.reg, tok.readonly).status_code == 200
        assert push_blob(c, tok.reg, "team/rw", b"via refresh token").status_code == 201
    seen = tok.ts.seen
    assert [(s.method, s.grant, s.user, s.client_id, s.status) for s in seen] == [
        ("POST", "refresh_token", "alice", "ferry", 200)
    ] * 2


def test_identity_token_falls_back_to_get_without_oauth(
    make_token_setup: Callable[..., TokenSetup], tmp_path: Path
) -> None:
    tok = make_token_setup(oauth=False)
    entry = {"username": "alice", "identitytoken": "idtok-alice-3"}
    path = write_config(tmp_path / "dc", {"auths": {tok.reg.host: entry}})
    with client_for(tok.reg, DockerConfigKeychain(path)) as c:
        assert get_manifest(c, tok.reg, tok.readonly).status_code == 200
    assert [(s.method, s.status) for s in tok.ts.seen] == [("POST", 405), ("GET", 200)]
    assert tok.ts.seen[1].user == "alice"


def test_wrong_identity_token_is_unauthorized(tok: TokenSetup, tmp_path: Path) -> None:
    path = write_config(tmp_path / "dc", {"auths": {tok.reg.host: {"identitytoken": "stale-token-6"}}})
    with client_for(tok.reg, DockerConfigKeychain(path)) as c, pytest.raises(Unauthorized) as e:
        get_manifest(c, tok.reg, tok.readonly)
    assert "token service refused" in str(e.value) and "stale-token-6" not in str(e.value)


def make_helper(bindir: Path, answers: dict[str, tuple[str, str]]) -> Path:
    """A ``docker-credential-ferrytest`` that logs what it was asked and answers from a table."""
    bindir.mkdir(parents=True, exist_ok=True)
    cases = "".join(
        f'  "{server}") printf \'%s\' \'{json.dumps({"ServerURL": server, "Username": u, "Secret": s})}\' ;;\n'
        for server, (u, s) in answers.items()
    )
    script = bindir / "docker-credential-ferrytest"
    script.write_text(
        "#!/bin/sh\n"
        '[ "$1" = get ] || { echo "unsupported: $1" >&2; exit 2; }\n'
        "server=$(cat)\n"
        f'printf "%s\\n" "$server" >> "{bindir}/asked.log"\n'
        'case "$server" in\n'
        f"{cases}"
        '  broken) echo "the keyring is locked" >&2; exit 1 ;;\n'
        '  *) echo "credentials not found in native keychain"; exit 1 ;;\n'
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return bindir


def test_credential_helper(tok: TokenSetup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = make_helper(tmp_path / "bin", {tok.reg.host: ("alice", USERS["alice"]),
                                            "127.0.0.9:1": ("<token>", "idtok-alice-3")})
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    path = write_config(tmp_path / "dc", {"credHelpers": {tok.reg.host: "ferrytest"}, "credsStore": "ferrytest"})
    kc = DockerConfigKeychain(path)
    with client_for(tok.reg, kc) as c:
        assert get_manifest(c, tok.reg, tok.readonly).status_code == 200
        assert c.head(f"{tok.reg.url}/v2/team/readonly/blobs/{tok.readonly.blobs[0]}").status_code == 200
    assert [(s.grant, s.user) for s in tok.ts.issued()] == [("basic", "alice")]
    # <token> as the username means the secret is an identity token.
    assert kc.resolve("127.0.0.9:1") == Credential(identity_token="idtok-alice-3")
    # The default store knows nothing of this one: no credential, not an error.
    assert kc.resolve("nothing.example:5000") is None
    assert kc.resolve("docker.io") is None
    with pytest.raises(Unauthorized, match="the keyring is locked"):
        kc.resolve("broken")
    asked = (bindir / "asked.log").read_text().split()
    # Docker Hub is asked for under its historical server URL; answers are cached.
    assert asked == [tok.reg.host, "127.0.0.9:1", "nothing.example:5000", "https://index.docker.io/v1/", "broken"]


def test_missing_credential_helper_is_reported(tmp_path: Path) -> None:
    path = write_config(tmp_path / "dc", {"credsStore": "ferry-absent-helper"})
    with pytest.raises(Unauthorized, match=r"docker-credential-ferry-absent-helper .* not on PATH"):
        DockerConfigKeychain(path).resolve("registry.example")


def test_docker_config_lookup_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = base64.b64encode(b"hubuser:hub-pw-7").decode()
    doc = {
        "auths": {
            "https://index.docker.io/v1/": {"auth": hub},
            "harbor.example:8443": {"username": "robot$ci", "password": "robot-pw-8"},
            "https://ghcr.io": {"registrytoken": "ghcr-token-9"},
            "empty.example": {},
        }
    }
    cfgdir = tmp_path / "dockercfg"
    write_config(cfgdir, doc)
    monkeypatch.setenv("DOCKER_CONFIG", str(cfgdir))
    kc = DockerConfigKeychain()
    assert kc.path == cfgdir / "config.json"
    for name in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        assert kc.resolve(name) == Credential(username="hubuser", password="hub-pw-7")
    assert kc.resolve("harbor.example:8443") == Credential(username="robot$ci", password="robot-pw-8")
    assert kc.resolve("HARBOR.example:8443") is not None
    assert kc.resolve("harbor.example") is None
    assert kc.resolve("ghcr.io") == Credential(registry_token="ghcr-token-9")
    assert kc.resolve("empty.example") is None
    assert DockerConfigKeychain(tmp_path / "absent.json").resolve("docker.io") is None


def test_ferry_docker_config_names_the_file_or_its_directory(tmp_path: Path) -> None:
    cfgdir = tmp_path / "dockercfg"
    path = write_config(cfgdir, {"auths": {"harbor.example": {"username": "u", "password": "p"}}})
    assert docker_config_file(str(path)) == path
    assert docker_config_file(str(cfgdir)) == path
    assert docker_config_file(None) is None
    with pytest.raises(ValueError, match="does not exist"):
        docker_config_file(str(tmp_path / "absent.json"))
    with pytest.raises(ValueError, match=r"holds no config\.json"):
        docker_config_file(str(tmp_path))
    s = FerrySettings(docker_config=str(cfgdir))
    assert build_keychain(s, lambda registry: 0).resolve("harbor.example") == Credential(username="u", password="p")


def test_static_and_chain_keychains() -> None:
    a = Credential(username="a", password="pa")
    b = Credential(username="b", password="pb")
    static = StaticKeychain({"https://index.docker.io/v1/": a, "quay.io": b})
    assert static.resolve("docker.io") == a and static.resolve("registry-1.docker.io") == a
    assert static.resolve("ghcr.io") is None
    chain = ChainKeychain(AnonymousKeychain(), StaticKeychain({"quay.io": a}), static)
    assert chain.resolve("quay.io") == a  # first hit wins
    assert chain.resolve("docker.io") == a
    assert chain.resolve("gcr.io") is None
    assert [canonical_registry(x) for x in ("Docker.IO", "https://127.0.0.1:5000/v2/", "ghcr.io")] == [
        "docker.io", "127.0.0.1:5000", "ghcr.io"]


def test_secrets_stay_out_of_reprs() -> None:
    c = Credential(username="u", password="pw-10", identity_token="it-11", registry_token="rt-12")
    for text in (repr(c), str(c), repr(StaticKeychain({"x.io": c})), repr(RegistryAuth("x.io", StaticKeychain({})))):
        assert "pw-10" not in text and "it-11" not in text and "rt-12" not in text
    assert "'u'" in repr(c) and "password" in repr(c)


# --------------------------------------------------------------------------- parsing


def test_parse_challenges() -> None:
    [c] = parse_challenges(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/ubuntu:pull,push",error="insufficient_scope"'
    )
    assert c.scheme == "bearer"
    assert dict(c.params) == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/ubuntu:pull,push",
        "error": "insufficient_scope",
    }
    several = parse_challenges(
        ['Negotiate abc123==, BASIC realm="say \\"hi\\", ok" , Bearer realm=https://t.example/token,scope="a b"',
         'Digest realm="x", nonce="n"']
    )
    assert [(c.scheme, dict(c.params)) for c in several] == [
        ("negotiate", {}),
        ("basic", {"realm": 'say "hi", ok'}),
        ("bearer", {"realm": "https://t.example/token", "scope": "a b"}),
        ("digest", {"realm": "x", "nonce": "n"}),
    ]
    assert parse_challenges("") == [] and parse_challenges([]) == []
    assert [c.scheme for c in parse_challenges('Basic realm="unterminated')] == ["basic"]


def test_scope_for_request() -> None:
    def scope(method: str, url: str) -> set[tuple[str, str, str]]:
        return set(scope_for_request(method, httpx.URL(url)))

    base = "https://r.example/v2"
    assert scope("GET", f"{base}/") == set()
    assert scope("HEAD", f"{base}/a/b/c/manifests/v1") == {("repository", "a/b/c", "pull")}
    assert scope("GET", f"{base}/lib/x/tags/list") == {("repository", "lib/x", "pull")}
    assert scope("PATCH", f"{base}/x/blobs/uploads/uuid") == {("repository", "x", "pull"), ("repository", "x", "push")}
    assert scope("POST", f"{base}/dst/blobs/uploads/?mount=sha256:ab&from=src/lib") == {
        ("repository", "dst", "pull"), ("repository", "dst", "push"), ("repository", "src/lib", "pull")}
    assert scope("DELETE", f"{base}/x/manifests/sha256:ab") == {("repository", "x", "delete")}
    assert scope("GET", f"{base}/_catalog") == {("registry", "catalog", "*")}


# --------------------------------------------------------------------------- redirects


@dataclass
class BlobStore:
    """Serves a registry's storage directory, as blob storage behind a redirect would, recording headers."""

    root: Path
    refuse: bool = False
    headers: list[dict[str, str]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    def start(self) -> BlobStore:
        store = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                store.headers.append({k.lower(): v for k, v in self.headers.items()})
                path = store.root / self.path.split("?", 1)[0].lstrip("/")
                if store.refuse:
                    body, status = b"no", 401
                elif path.is_file() and store.root in path.resolve().parents:
                    body, status = path.read_bytes(), 200
                else:
                    body, status = b"missing", 404
                self.send_response(status)
                if status == 401:
                    self.send_header("WWW-Authenticate", 'Basic realm="blob-store"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@dataclass
class RedirectingRegistry(Registry):
    """distribution with its ``redirect`` storage middleware: blob GETs answer 307 to ``blob_url``."""

    blob_url: str = ""

    def config(self) -> str:
        return super().config() + (
            "middleware:\n  storage:\n    - name: redirect\n      options:\n"
            f"        baseurl: {self.blob_url}\n"
        )


@pytest.fixture
def redirecting(tmp_path: Path) -> Iterator[tuple[TokenServer, RedirectingRegistry, BlobStore, Image]]:
    store = BlobStore(tmp_path / "redir" / "data").start()
    with TokenServer(tmp_path / "redir-token", users=USERS, acl=ACL) as ts:
        reg = RedirectingRegistry(root=tmp_path / "redir", token=ts.registry_token, blob_url=store.url)
        reg.start()
        try:
            with httpx.Client(auth=RegistryAuth(reg.host, StaticKeychain({reg.host: cred("admin")})),
                              timeout=30) as admin:
                img = push_image(Pusher(reg.url, client=admin), "team/readonly", "v1", salt="redir")
            yield ts, reg, store, img
        finally:
            reg.stop()
            store.stop()


def test_authorization_is_not_forwarded_across_redirects(
    redirecting: tuple[TokenServer, RedirectingRegistry, BlobStore, Image],
) -> None:
    ts, reg, store, img = redirecting
    digest = img.blobs[-1]
    with client_for(reg, StaticKeychain({reg.host: cred("alice")}), follow_redirects=True) as c:
        r = c.get(f"{reg.url}/v2/{img.repo}/blobs/{digest}")
        assert r.status_code == 200 and sha(r.content) == digest
        hop = r.history[-1]
        assert hop.status_code == 307 and hop.request.headers["Authorization"].startswith("Bearer ")
        assert str(r.url).startswith(store.url)
        assert len(store.headers) == 1 and "authorization" not in store.headers[0]

        # A 401 from the storage host is handed back, never answered with registry credentials.
        store.refuse = True
        r = c.get(f"{reg.url}/v2/{img.repo}/blobs/{digest}")
        assert r.status_code == 401 and str(r.url).startswith(store.url)
        assert len(store.headers) == 2 and "authorization" not in store.headers[1]
    assert [s.scopes for s in ts.issued() if s.user == "alice"] == [("repository:team/readonly:pull",)]
