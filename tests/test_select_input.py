"""Selector input through ``python -m producer enqueue`` against a real Redis: bad selectors exit 2 and
enqueue nothing; a skopeo sync YAML becomes the same jobs as the equivalent list."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from producer.cli import main
from producer.listfile import ListFileError
from producer.skopeo_yaml import parse_skopeo_yaml
from tests.support.redis import RedisServer
from tests.support.workers import ferry_env, run_producer

TARGET = "127.0.0.1:5999/m"
DIGEST = "sha256:" + "a" * 64


def assert_nothing_enqueued(redis_server: RedisServer) -> None:
    with redis_server.client() as c:
        assert c.keys("*") == []


@pytest.mark.parametrize(("content", "expected"), [
    ("--tags=[ redis\n", ["bad.txt:1:", "invalid --tags regex"]),
    ('nginx\n--semver=">>1" redis\n', ["bad.txt:2:", "invalid --semver range"]),
    ("--latest=0 redis\n", ["bad.txt:1:", "--latest=0"]),
    ("--tags=x redis:7\n", ["bad.txt:1:", "drop ':tag'"]),
    (f"--semver=1 redis@{DIGEST}\n", ["bad.txt:1:", "pinned to a digest"]),
    ("--tags=x a/x 127.0.0.1:5999/m/x\n--tags=y b/x 127.0.0.1:5999/m/x\n", ["bad.txt:2:", "filled by the selector"]),
], ids=["regex", "semver", "latest-0", "tag", "digest", "two-sources-one-repository"])
def test_bad_selectors_exit_2_and_enqueue_nothing(tmp_path: Path, redis_server: RedisServer, content: str,
                                                  expected: list[str], monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    listing = tmp_path / "bad.txt"
    listing.write_text(content)
    monkeypatch.setenv("FERRY_BROKER_URL", redis_server.url)
    assert main(["enqueue", str(listing), "--target", TARGET]) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err
    assert "nothing was enqueued" in err
    assert_nothing_enqueued(redis_server)


def test_prune_takes_one_selector_line_per_destination_repository(
        tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    listing = tmp_path / "two.txt"
    listing.write_text("--semver=^7 redis\n--tags=^7-alpine$ redis\n")
    monkeypatch.setenv("FERRY_BROKER_URL", redis_server.url)
    assert main(["enqueue", str(listing), "--target", TARGET, "--prune"]) == 2
    err = capsys.readouterr().err
    assert "two.txt:2:" in err and "with --prune each destination repository takes one selector line" in err
    assert_nothing_enqueued(redis_server)
    # Without pruning, two selections from one repository simply add up.
    r = run_producer(["enqueue", str(listing), "--target", TARGET], ferry_env(redis_server.url, tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr


SKOPEO = f"""
# skopeo sync --src yaml --dest docker <this file> {TARGET}
docker.io:
  images:
    nginx: ["1.27.0", "{DIGEST}"]
    busybox: []
  images-by-tag-regex:
    bitnami/kubectl: ^1\\.30\\.[0-9]+$
"127.0.0.1:5001":
  images-by-semver:
    kube-proxy: ">= 1.28, < 1.31"
  tls-verify: false
quay.io:
  images:
    prometheus/node-exporter:
      - v1.8.0
"""
EQUIVALENT = f"""
nginx:1.27.0
nginx@{DIGEST}
--all-tags busybox
--tags=^1\\.30\\.[0-9]+$ bitnami/kubectl
--semver=">= 1.28 < 1.31" 127.0.0.1:5001/kube-proxy
quay.io/prometheus/node-exporter:v1.8.0
"""


def enqueued(redis_server: RedisServer, tmp_path: Path, name: str, content: str) -> dict[str, Any]:
    path = tmp_path / name
    path.write_text(content)
    r = run_producer(["enqueue", str(path), "--target", TARGET], ferry_env(redis_server.url, tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    with redis_server.client() as c:
        meta = json.loads(c.get(f"ferry:batch:{r.stdout.strip()}:meta") or b"{}")
    return {"stderr": r.stderr, "jobs": _plain(meta["jobs"]), "expansions": _plain(meta["expansions"])}


def _plain(items: list[dict[str, Any]]) -> list[str]:
    # The same work, whatever batch and line it came from.
    return sorted(json.dumps({k: v for k, v in i.items() if k not in ("batch_id", "line")}, sort_keys=True)
                  for i in items)


def test_a_skopeo_sync_yaml_and_the_equivalent_list_enqueue_the_same_jobs(tmp_path: Path,
                                                                          redis_server: RedisServer) -> None:
    from_yaml = enqueued(redis_server, tmp_path, "sync.yaml", SKOPEO)
    from_list = enqueued(redis_server, tmp_path, "images.txt", EQUIVALENT)
    assert from_yaml["jobs"] == from_list["jobs"] and len(from_yaml["jobs"]) == 3
    assert from_yaml["expansions"] == from_list["expansions"] and len(from_yaml["expansions"]) == 3
    assert "FERRY_INSECURE_REGISTRIES" in from_yaml["stderr"]  # tls-verify: false is a worker setting here


def test_credentials_in_a_skopeo_yaml_are_refused(tmp_path: Path, redis_server: RedisServer,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "sync.yml"
    path.write_text("quay.io:\n  credentials:\n    username: john\n    password: pw-Zq81\n"
                    "  images:\n    coreos/etcd: [latest]\n")
    monkeypatch.setenv("FERRY_BROKER_URL", redis_server.url)
    assert main(["enqueue", str(path), "--target", TARGET]) == 2
    out, err = capsys.readouterr()
    assert "sync.yml:2:" in err and "FERRY_REGISTRIES" in err and "~/.docker/config.json" in err
    assert "pw-Zq81" not in out + err
    assert_nothing_enqueued(redis_server)


@pytest.mark.parametrize(("yaml_text", "reason"), [
    ("docker.io:\n  images:\n    nginx: 1.27\n", "expected a list of tags"),
    ("docker.io:\n  images-by-semver:\n    nginx: '>>1'\n", "invalid --semver range"),
    ("docker.io:\n  images-by-tag-regex:\n    nginx: '['\n", "invalid --tags regex"),
    ("docker.io:\n  imagez: {}\n", "unknown skopeo sync key 'imagez'"),
    ("docker.io: [\n", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping of registries"),
])
def test_bad_skopeo_yaml_names_the_line(yaml_text: str, reason: str) -> None:
    with pytest.raises(ListFileError) as caught:
        parse_skopeo_yaml(yaml_text.encode())
    assert any(reason in e.reason for e in caught.value.errors), caught.value
