"""Listing tags (paginated, through the cluster's limits) and pruning, against real docker-registry processes."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from config.reference import Reference
from tests.support.faultproxy import FaultProxy, Rule, too_many_requests
from tests.support.images import OCI_MANIFEST, Pusher, push_image, sha
from tests.support.redis import RedisServer
from tests.support.registry import Registry
from tests.support.tagpages import paginated_tags
from tests.support.tokenserver import TokenServer
from workers.cluster.coordinator import RedisCoordinator
from workers.cluster.ratelimit import Limit
from workers.engine.auth import RegistryAuth
from workers.engine.errors import NotFound
from workers.engine.keychain import Credential, StaticKeychain
from workers.engine.prune import incoming_digests, prune_repository
from workers.engine.retry import RetryPolicy
from workers.engine.tags import list_tags, next_link
from workers.engine.transport import RegistryTransport

TAGS = [f"v1.{i // 10}.{i % 10}" for i in range(30)]
SIG = "sha256-" + "cd" * 32


def tag_all(pusher: Pusher, repo: str, tags: list[str], salt: str = "s0") -> str:
    """One small image under every tag; returns its digest."""
    img = push_image(pusher, repo, tags[0], layers=1, layer_size=512, salt=salt)
    body = pusher.client.get(f"{pusher.base_url}/v2/{repo}/manifests/{img.digest}",
                             headers={"Accept": OCI_MANIFEST}).content
    for t in tags[1:]:
        pusher.manifest(repo, t, body, OCI_MANIFEST)
    return img.digest


def push_signature(pusher: Pusher, repo: str, tag: str) -> bytes:
    """A cosign-style artifact under ``tag`` and ``tag.sig``; returns its manifest."""
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": pusher.blob(repo, b"{}"),
                                  "size": 2}, "layers": []}).encode()
    pusher.manifest(repo, f"{tag}.sig", body, OCI_MANIFEST)
    pusher.manifest(repo, tag, body, OCI_MANIFEST)
    return body


@pytest.fixture
def transport() -> Iterator[RegistryTransport]:
    t = RegistryTransport(retry=RetryPolicy(4, 0.05, 0.2))
    yield t
    t.close()


def test_next_link_takes_path_and_query_of_rel_next() -> None:
    assert next_link('</v2/a/b/tags/list?n=7&last=v1>; rel="next"') == "/v2/a/b/tags/list?n=7&last=v1"
    assert next_link('<https://r.example/v2/a/tags/list?last=x>; rel=next') == "/v2/a/tags/list?last=x"
    assert next_link('</v2/a/tags/list?last=x>; rel="prev"') is None
    assert next_link(None) is None


def test_pages_smaller_than_the_tag_count_are_all_followed(src: Registry, src_pusher: Pusher,
                                                           make_fault_proxy: Callable[[str], FaultProxy],
                                                           transport: RegistryTransport) -> None:
    tag_all(src_pusher, "k8s/api", TAGS)
    proxy = make_fault_proxy(src.host)
    proxy.add_rule(paginated_tags(src.host, max_page=10))
    got = list_tags(transport, Reference.parse(f"{proxy.host}/k8s/api"), page_size=7)
    assert sorted(got) == sorted(TAGS)
    assert proxy.count("GET", r"/tags/list") == math.ceil(30 / 7)
    # The registry caps the page below what was asked: its Link pages are followed all the same.
    proxy.reset_counts()
    assert sorted(list_tags(transport, Reference.parse(f"{proxy.host}/k8s/api"), page_size=100)) == sorted(TAGS)
    assert proxy.count("GET", r"/tags/list") == 3


def test_a_registry_that_ignores_n_answers_in_one_page(src: Registry, src_pusher: Pusher,
                                                        transport: RegistryTransport) -> None:
    tag_all(src_pusher, "k8s/api", TAGS)
    assert sorted(list_tags(transport, Reference.parse(f"{src.host}/k8s/api"), page_size=7)) == sorted(TAGS)
    with pytest.raises(NotFound):
        list_tags(transport, Reference.parse(f"{src.host}/no/such"), page_size=7)


def test_listing_goes_through_cluster_limits_and_quota_pauses(
        src: Registry, src_pusher: Pusher, make_fault_proxy: Callable[[str], FaultProxy],
        redis_server: RedisServer) -> None:
    tag_all(src_pusher, "k8s/api", TAGS)
    proxy = make_fault_proxy(src.host)
    proxy.add_rule(Rule(too_many_requests("1"), method="GET", path_re=r"/tags/list\?.*last=v1\.0\.8", times=1))
    proxy.add_rule(paginated_tags(src.host, max_page=3))
    coord = RedisCoordinator.from_url(redis_server.url, owner="lister",
                                      limits={proxy.host: Limit(max_concurrency=1, requests_per_second=5.0)})
    other = RedisCoordinator.from_url(redis_server.url, owner="other")
    t = RegistryTransport(retry=RetryPolicy(4, 0.05, 0.2), coordinator=coord)
    try:
        t0 = time.monotonic()
        got = list_tags(t, Reference.parse(f"{proxy.host}/k8s/api"), page_size=3)
        elapsed = time.monotonic() - t0
        paused = other.pause_until(proxy.host)
    finally:
        t.close()
        coord.close()
        other.close()
    assert sorted(got) == sorted(TAGS)
    pages = proxy.select("GET", r"/tags/list")
    assert len(pages) == 10 + 1  # ten pages and the one refused
    assert proxy.max_rate(1.0, "GET", r"/tags/list") <= 6  # 5/s and the bucket's first token
    # The 429's Retry-After paused the registry for every worker, not only the lister.
    refused = next(s for s in pages if s.status == 429)
    after = [s.start for s in pages if s.start > refused.start]
    assert min(after) - refused.start >= 0.95
    assert paused is None or paused <= time.time()
    assert elapsed >= 1.0


def test_prune_deletes_unselected_tags_but_never_a_signature_or_a_shared_manifest(
        dst: Registry, transport: RegistryTransport, make_fault_proxy: Callable[[str], FaultProxy]) -> None:
    with Pusher(dst.url) as pusher:
        shared = tag_all(pusher, "m/app", ["v1", "v2", "old-alias"])
        tag_all(pusher, "m/app", ["old1", "old2"], salt="s1")
        sig = push_signature(pusher, "m/app", SIG)
    proxy = make_fault_proxy(dst.host)
    repo = Reference.parse(f"{proxy.host}/m/app")

    planned = prune_repository(transport, repo, {"v1", "v2"}, dry_run=True, page_size=100)
    assert sorted(planned.would_delete) == ["old-alias", "old1", "old2"]
    assert proxy.count("DELETE") == 0 and planned.deleted == []

    done = prune_repository(transport, repo, {"v1", "v2"}, dry_run=False, page_size=100)
    assert sorted(done.deleted) == ["old1", "old2"], done
    # distribution deletes manifests, not tags: the alias of a kept tag stays, and says why.
    assert list(done.failed) == ["old-alias"] and "shares its manifest with v" in done.failed["old-alias"]
    left = httpx.get(f"{dst.url}/v2/m/app/tags/list").json()["tags"]
    assert sorted(left) == sorted(["v1", "v2", "old-alias", SIG, f"{SIG}.sig"])
    assert dst.manifest_digest("m/app", "v1") == shared
    assert dst.manifest_digest("m/app", f"{SIG}.sig") == sha(sig)


def test_prune_spares_a_manifest_a_selected_tag_is_about_to_get(dst: Registry, src: Registry,
                                                                src_pusher: Pusher,
                                                                transport: RegistryTransport) -> None:
    # The source's v2 is the image the destination keeps under an old name; v2 is not copied yet.
    digest = tag_all(src_pusher, "m/app", ["v2"])
    body = httpx.get(f"{src.url}/v2/m/app/manifests/v2", headers={"Accept": OCI_MANIFEST}).content
    doc = json.loads(body)
    with Pusher(dst.url) as pusher:
        tag_all(pusher, "m/app", ["v1"], salt="s1")
        for desc in [doc["config"], *doc["layers"]]:
            pusher.blob("m/app", httpx.get(f"{src.url}/v2/m/app/blobs/{desc['digest']}").content)
        assert pusher.manifest("m/app", "renamed", body, OCI_MANIFEST) == digest
    incoming = incoming_digests(transport, Reference.parse(f"{src.host}/m/app"), ["v1", "v2"], children=False)
    assert digest in incoming
    done = prune_repository(transport, Reference.parse(f"{dst.host}/m/app"), {"v1", "v2"}, dry_run=False,
                            page_size=100, incoming=lambda: incoming)
    assert done.deleted == [] and "a selected tag being copied" in done.failed["renamed"]
    assert dst.manifest_digest("m/app", "renamed") == digest


def test_a_registry_that_refuses_deletes_gets_a_clear_message(transport: RegistryTransport,
                                                             make_registry: Callable[..., Registry]) -> None:
    reg = make_registry("nodelete", delete_enabled=False)
    with Pusher(reg.url) as pusher:
        tag_all(pusher, "m/app", ["keep"])
        tag_all(pusher, "m/app", ["gone"], salt="s1")
    done = prune_repository(transport, Reference.parse(f"{reg.host}/m/app"), {"keep"}, dry_run=False, page_size=100)
    assert done.deleted == []
    assert "refuses deletes" in done.failed["gone"] and "storage.delete.enabled: true" in done.failed["gone"]
    assert sorted(httpx.get(f"{reg.url}/v2/m/app/tags/list").json()["tags"]) == ["gone", "keep"]


def test_listing_and_pruning_behind_token_auth_ask_for_pull_and_delete(
        tmp_path: Path, make_registry: Callable[..., Registry]) -> None:
    users = {"robot": "robot-pw"}
    with TokenServer(tmp_path / "tokens", users=users, acl={"robot": {"*": "*"}}) as ts:
        reg = make_registry("tok", token=ts.registry_token)
        keychain = StaticKeychain({reg.host: Credential("robot", "robot-pw")})
        with httpx.Client(auth=RegistryAuth(reg.host, keychain), timeout=30) as c:
            pusher = Pusher(reg.url, client=c)
            tag_all(pusher, "m/app", ["keep"])
            tag_all(pusher, "m/app", ["gone"], salt="s1")
        ts.clear()
        t = RegistryTransport(keychain=keychain, retry=RetryPolicy(3, 0.05, 0.2))
        try:
            repo = Reference.parse(f"{reg.host}/m/app")
            assert sorted(list_tags(t, repo)) == ["gone", "keep"]
            done = prune_repository(t, repo, {"keep"}, dry_run=False, page_size=100)
            assert done.deleted == ["gone"], done
            assert list_tags(t, repo) == ["keep"]
        finally:
            t.close()
        scopes = {s for r in ts.issued() for s in r.scopes}
        assert "repository:m/app:pull" in scopes
        assert any(s.startswith("repository:m/app:") and "delete" in s for s in scopes), scopes
