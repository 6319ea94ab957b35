"""Secrets stay on the workers: registry passwords, bearer tokens and the broker password never reach
Redis (task messages, results, batch records), logs, producer output, reports or Flower.

Covered elsewhere, not repeated here:
- bearer tokens are not sent to another host on redirect: tests/test_auth.py
  ::test_authorization_is_not_forwarded_across_redirects;
- Flower on a non-loopback address without authentication exits 2: tests/test_bad_input.py
  ::test_worker_bad_settings[open-flower];
- blob cache paths come only from validated digests: tests/test_cache.py
  ::test_bad_digests_are_rejected_before_touching_disk.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.cluster import Cluster, make_cluster_fixture  # noqa: F401  (fixture)
from tests.support.htpasswd import write_htpasswd
from tests.support.images import Pusher, push_image
from tests.support.procs import free_port, port_open, stop, wait_until
from tests.support.registry import Registry
from tests.support.tls import PrivateCA, non_loopback_addresses
from tests.support.tokenserver import TokenServer
from tests.support.workers import ROOT
from workers.engine.auth import RegistryAuth
from workers.engine.errors import CertificateError
from workers.engine.keychain import Credential, StaticKeychain
from workers.engine.transport import RegistryTransport

pytestmark = pytest.mark.faults

BROKER_PW = "R3dis-Secr3t-broker-5e1"
DST_PW = "S3cr3t-dst-pw-7731"
SRC_PW = "T0ken-src-pw-9c1"
ADMIN_PW = "T0ken-admin-pw-44a"
FLOWER_PW = "Fl0wer-pw-2b7"


def redis_dump(c: Cluster) -> str:
    """Every key and value in Redis as text, with kombu's base64 message bodies decoded."""
    parts: list[bytes] = []
    with c.redis.client() as r:
        for key in r.keys("*"):
            parts.append(key)
            kind = r.type(key).decode()
            if kind == "string":
                parts.append(r.get(key) or b"")
            elif kind == "hash":
                for k, v in r.hgetall(key).items():
                    parts += [k, v]
            elif kind == "list":
                parts += r.lrange(key, 0, -1)
            elif kind == "set":
                parts += list(r.smembers(key))
            elif kind == "zset":
                parts += [m for m, _ in r.zrange(key, 0, -1, withscores=True)]
    text = b"\n".join(parts).decode(errors="replace")
    for body in re.findall(r'"body": "([A-Za-z0-9+/=]+)"', text):
        text += "\n" + base64.b64decode(body).decode(errors="replace")
    return text


@pytest.fixture
def flower_port(make_cluster: Callable[..., Cluster]) -> Iterator[Callable[[Cluster], int]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(c: Cluster) -> int:
        port = free_port()
        with open(c.tmp / "flower.log", "ab") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "workers", "flower", "--port", str(port),
                                           "--basic-auth", f"admin:{FLOWER_PW}"],
                                          cwd=ROOT, env=c.env, stdout=log, stderr=log, start_new_session=True))
        wait_until(lambda: port_open(port), 60, "flower")
        return port

    yield start
    for p in procs:
        stop(p)


def test_no_secret_leaves_the_workers(tmp_path: Path, make_cluster: Callable[..., Cluster],
                                      make_registry: Callable[..., Registry],
                                      flower_port: Callable[[Cluster], int]) -> None:
    # Source: token auth; destination: htpasswd basic auth; broker: requirepass.
    ts = TokenServer(tmp_path / "token", users={"puller": SRC_PW, "admin": ADMIN_PW},
                     acl={"puller": {"*": ["pull"]}, "admin": {"*": ["*"]}}).start()
    issued: list[str] = []
    sign = ts.sign

    def recording_sign(*args: object) -> str:
        token = sign(*args)  # type: ignore[arg-type]
        issued.append(token)
        return token

    ts.sign = recording_sign  # type: ignore[method-assign]
    try:
        src = make_registry("src", token=ts.registry_token)
        dst = make_registry("dst", htpasswd=write_htpasswd(tmp_path / "htpasswd", {"u": DST_PW}))
        admin = RegistryAuth(src.host, StaticKeychain({src.host: Credential(username="admin", password=ADMIN_PW)}))
        with httpx.Client(auth=admin, timeout=30) as client:
            pusher = Pusher(src.url, client=client)
            imgs = [push_image(pusher, f"app/a{i}", layers=1) for i in range(2)]
        registries = {src.host: {"username": "puller", "password": SRC_PW},
                      dst.host: {"username": "u", "password": DST_PW}}
        c = make_cluster(password=BROKER_PW, FERRY_REGISTRIES=json.dumps(registries), FERRY_TASK_MAX_RETRIES="0")
        port = flower_port(c)
        c.start_worker("w", loglevel="DEBUG")
        listing = c.listing([f"{src.host}/{i.repo}:v1" for i in imgs] + [f"{src.host}/app/missing:v1"])
        run = c.producer("enqueue", str(listing), "--target", f"{dst.host}/mirror", "--wait")
        assert run.returncode == 1, run.stdout + run.stderr  # the missing image fails
        for i in imgs:
            # Only the right credentials can read the mirror back.
            r = httpx.head(f"{dst.url}/v2/mirror/{i.repo}/manifests/v1", auth=("u", DST_PW),
                           headers={"Accept": i.media_type})
            assert r.headers.get("Docker-Content-Digest") == i.digest
        assert issued, "the source never issued a bearer token"
        batch = c.latest_batch()
        report = c.producer("report", batch, "--json", "-")
        assert report.returncode == 1

        task_id = next(iter(c.hash(batch, "results")))
        base = f"http://127.0.0.1:{port}"
        auth = ("admin", FLOWER_PW)
        wait_until(lambda: task_id in httpx.get(f"{base}/api/tasks", auth=auth, timeout=10).text, 30,
                   "flower saw the tasks")
        flower = [httpx.get(f"{base}{p}", auth=auth, timeout=10).text
                  for p in ("/api/tasks", "/tasks", "/tasks/datatable?draw=1&start=0&length=100",
                            f"/task/{task_id}", f"/api/task/info/{task_id}", "/workers", "/api/workers")]
        assert "app/a0" in flower[0] and task_id in flower[3]

        places = {
            "redis": redis_dump(c),
            "worker log": c.logs(),
            "flower log": (c.tmp / "flower.log").read_text(errors="replace"),
            "producer output": run.stdout + run.stderr,
            "report": report.stdout + report.stderr,
            "flower pages": "\n".join(flower),
        }
        assert "ferry:batch:" in places["redis"] and "app/a0" in places["redis"]
        assert "DEBUG" in places["worker log"]
        secrets = {"broker password": BROKER_PW, "destination password": DST_PW, "source password": SRC_PW,
                   "admin password": ADMIN_PW, "flower password": FLOWER_PW}
        secrets |= {f"bearer token {n}": t for n, t in enumerate(issued)}
        # A JWT's signature alone is a secret too; so is the basic-auth header value.
        secrets |= {f"token signature {n}": t.rsplit(".", 1)[1] for n, t in enumerate(issued)}
        secrets["basic header"] = base64.b64encode(f"u:{DST_PW}".encode()).decode()
        leaks = [f"{s} in {p}" for p, text in places.items() for s, v in secrets.items() if v in text]
        assert leaks == []
    finally:
        ts.stop()


def test_tls_is_verified_except_for_loopback_and_listed_insecure_registries(
        tmp_path: Path, make_registry: Callable[..., Registry]) -> None:
    address = next(iter(non_loopback_addresses()), None)
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to serve a registry on")
    ca = PrivateCA(tmp_path / "ca")
    tls = make_registry("tls", address=address, tls=ca.server(address), ssl_context=ca.context())
    plain = make_registry("plain")
    t = RegistryTransport()
    try:
        assert t.base_url("registry.example.com") == "https://registry.example.com"
        assert t.base_url("localhost:5000") == "http://localhost:5000"
        with pytest.raises(CertificateError, match=f"certificate verify failed for {tls.host}"):
            t.request("GET", tls.host, "/v2/")
        assert t.request("GET", plain.host, "/v2/").status_code == 200
    finally:
        t.close()
    insecure = RegistryTransport(insecure_registries=[tls.host])
    try:
        assert insecure.request("GET", tls.host, "/v2/").status_code == 200
        assert insecure.base_url(tls.host) == f"https://{tls.host}"
    finally:
        insecure.close()
