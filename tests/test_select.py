"""Selector lines, dry runs and pruning end to end: producer -> real Redis -> real workers -> real registries.

The source repository holds about 30 tags. distribution 2.8 ignores ``n`` on tags/list, so the source
is read through the fault proxy with tests/support/tagpages.py paging its real tag list (10 per page
at most; the workers ask for 7). Every expected tag set below is written from the selector rules in
README ("Selecting tags"), not computed by ferry's code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.support.cluster import Cluster, make_cluster_fixture  # noqa: F401  (fixture)
from tests.support.faultproxy import FaultProxy
from tests.support.images import Image, Pusher, push_image
from tests.support.registry import Registry
from tests.support.tagpages import paginated_tags

pytestmark = pytest.mark.selectors

SIG = "sha256-" + "ef" * 32
TAGS = [
    "v1.26.0", "v1.27.9", "v1.28.0", "v1.28.1-rc.0", "v1.28.4", "v1.29.0-rc.1", "v1.29.1", "v1.30.0", "v1.30.1",
    "1.30.2", "v1.30.3-rc.1", "v1.31.0-alpha.0", "latest", "stable", "2024-05-01", "sha-abc123", "6.2.14", "7",
    "7.2", "7.0.0", "7.2.4", "7.3.0", "7.4.0", "7.4.1-rc.1", "8.0.0-rc.1", "main", "edge", "foo-rc",
    "v2.0.0-beta.1",
]
REGEX = {"v1.30.0", "v1.30.1"}
SEMVER = {"v1.28.0", "v1.28.4", "v1.29.1", "v1.30.0", "v1.30.1", "1.30.2"}
LATEST = {"7.2.4", "7.3.0", "7.4.0"}
ALL_BUT_RC = set(TAGS) - {"v1.28.1-rc.0", "v1.29.0-rc.1", "v1.30.3-rc.1", "7.4.1-rc.1", "8.0.0-rc.1", "foo-rc"}
SELECTORS = [
    (r"--tags=^v1\.30\.[0-9]+$", "regex", REGEX),
    ('--semver=">=1.28 <1.31"', "semver", SEMVER),
    ('--semver=">=7" --latest=3', "latest", LATEST),
    ("--all-tags --exclude-tags=-rc", "all", ALL_BUT_RC),
]


@pytest.fixture
def source(src: Registry, src_pusher: Pusher,
           make_fault_proxy: Callable[[str], FaultProxy]) -> Iterator[tuple[FaultProxy, dict[str, Image]]]:
    """``k8s/app`` with every tag in TAGS (each its own small image) and a cosign-style signature tag."""
    images = {t: push_image(src_pusher, "k8s/app", t, layers=1, layer_size=512, salt=t) for t in TAGS}
    body = src_pusher.client.get(f"{src.url}/v2/k8s/app/manifests/v1.30.0",
                                 headers={"Accept": images["v1.30.0"].media_type}).content
    src_pusher.manifest("k8s/app", f"{SIG}.sig", body, images["v1.30.0"].media_type)
    proxy = make_fault_proxy(src.host)
    proxy.add_rule(paginated_tags(src.host, max_page=10))
    yield proxy, images


def tags_of(reg: Registry, repo: str) -> set[str]:
    r = httpx.get(f"{reg.url}/v2/{repo}/tags/list")
    return set(r.json().get("tags") or []) if r.status_code == 200 else set()


def cluster_with_workers(make_cluster: Callable[..., Cluster], workers: int = 2) -> Cluster:
    # COLUMNS: report tables keep each image on one line.
    c = make_cluster(FERRY_TAG_PAGE_SIZE="7", FERRY_TASK_MAX_RETRIES="0", FERRY_RETRY__ATTEMPTS="2", COLUMNS="300")
    for i in range(workers):
        c.start_worker(f"n{i}", concurrency=2)
    return c


def test_each_selector_fills_its_repository_with_exactly_the_selected_tags(
        make_cluster: Callable[..., Cluster], dst: Registry, source: tuple[FaultProxy, dict[str, Image]]) -> None:
    proxy, images = source
    c = cluster_with_workers(make_cluster)
    lines = [f"{opts}  {proxy.host}/k8s/app  {dst.host}/sel/{name}   # {name}" for opts, name, _ in SELECTORS]
    listing = c.listing(["# one repository, four selections", *lines])
    report = c.tmp / "report.json"
    r = c.producer("enqueue", str(listing), "--wait", "--json", str(report))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "expanding 4 repositories" in r.stderr
    # Listing went page by page (at most 7 asked, 10 served): 30 tags need 5 pages per selector line.
    # (Workers also list the repository once per process for its signature tags, in pages of 10.)
    assert proxy.count("GET", r"/tags/list\?n=7$") == 4
    assert proxy.count("GET", r"/tags/list\?n=7&last=") == 4 * 4
    for _, name, expected in SELECTORS:
        assert tags_of(dst, f"sel/{name}") == expected, name
        for tag in expected:
            assert dst.manifest_digest(f"sel/{name}", tag) == images[tag].digest, (name, tag)
    doc = json.loads(report.read_text())
    total = sum(len(e) for _, _, e in SELECTORS)
    assert doc["summary"]["total"] == total and doc["summary"]["synced"] == total
    # Every expanded image is reported with the line it came from.
    line_of = {name: n for n, (_, name, _) in enumerate(SELECTORS, start=2)}
    for image in doc["images"]:
        name = image["destinations"][0]["destination"].split("/sel/")[1].split(":")[0]
        assert image["line"] == line_of[name], image
    assert {e["line"]: sorted(e["selected"]) for e in doc["expansions"]} == {
        line_of[name]: sorted(expected) for _, name, expected in SELECTORS}
    assert all(e["listed"] == len(TAGS) + 1 for e in doc["expansions"])  # the .sig tag is listed, never selected
    batch = doc["batch_id"]
    shown = c.producer("report", batch)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    for tag in ("v1.30.1", "7.3.0", "2024-05-01"):
        assert re.search(rf"\b{line_of['all']}\b.*k8s/app:{re.escape(tag)}", shown.stdout), shown.stdout


def test_selector_lines_follow_targets_flatten_and_a_second_run_is_up_to_date(
        make_cluster: Callable[..., Cluster], dst: Registry, source: tuple[FaultProxy, dict[str, Image]]) -> None:
    proxy, images = source
    c = cluster_with_workers(make_cluster, workers=1)
    listing = c.listing([f"{SELECTORS[0][0]} {proxy.host}/k8s/app"])
    args = ("enqueue", str(listing), "--target", f"{dst.host}/a", "--target", f"{dst.host}/b", "--flatten", "--wait")
    first = c.producer(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    for ns in ("a", "b"):
        assert tags_of(dst, f"{ns}/app") == REGEX
        assert dst.manifest_digest(f"{ns}/app", "v1.30.1") == images["v1.30.1"].digest
    again = c.producer(*args, "--json", "-")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already up to date" in again.stdout


def test_dry_run_writes_nothing_and_says_what_would_happen(
        make_cluster: Callable[..., Cluster], src: Registry, dst: Registry, src_pusher: Pusher,
        source: tuple[FaultProxy, dict[str, Image]], make_fault_proxy: Callable[[str], FaultProxy]) -> None:
    proxy, images = source
    c = cluster_with_workers(make_cluster, workers=1)
    # The destination already has some of it, and a tag the selector no longer selects.
    warm = c.listing([f"{proxy.host}/k8s/app:v1.30.0 {dst.host}/sel/app:v1.30.0",
                      f"{proxy.host}/k8s/app:v1.26.0 {dst.host}/sel/app:v1.26.0",
                      f"{proxy.host}/k8s/app:stable {dst.host}/plain/app:stable"], "warm.txt")
    assert c.producer("enqueue", str(warm), "--wait").returncode == 0
    before = {repo: tags_of(dst, repo) for repo in ("sel/app", "plain/app")}
    counting = make_fault_proxy(dst.host)
    listing = c.listing([
        f"{SELECTORS[0][0]} {proxy.host}/k8s/app {counting.host}/sel/app",
        f"{proxy.host}/k8s/app:stable {counting.host}/plain/app:stable",
        f"{proxy.host}/k8s/app:main {counting.host}/plain/app:main",
        f"{proxy.host}/k8s/missing:v1 {counting.host}/plain/missing:v1",
        f"--all-tags {proxy.host}/k8s/none {counting.host}/sel/none",
    ])
    r = c.producer("enqueue", str(listing), "--dry-run", "--prune", "--wait", "--json", str(c.tmp / "dry.json"))
    assert r.returncode == 1, r.stdout + r.stderr  # one image would fail
    out = r.stdout + r.stderr
    counting.wait_idle()
    writes = [s for s in counting.requests if s.method in ("PUT", "POST", "PATCH", "DELETE")]
    assert writes == [], writes
    assert counting.count("HEAD") > 0
    assert {repo: tags_of(dst, repo) for repo in before} == before
    doc = json.loads((c.tmp / "dry.json").read_text())
    status = {i["source"].rsplit("/", 1)[1]: i["status"] for i in doc["images"]}
    assert status == {"app:v1.30.0": "up_to_date", "app:v1.30.1": "would_copy", "app:stable": "up_to_date",
                      "app:main": "would_copy", "missing:v1": "failed"}
    main = next(i for i in doc["images"] if i["source"].endswith(":main"))
    # Its config and one layer are missing at the destination.
    assert main["destinations"][0]["blobs_copied"] == 2
    assert main["destinations"][0]["bytes_transferred"] == images["main"].size + _config_size(src, images["main"])
    assert re.search(r"would copy \(2 blobs", out), out
    assert "up to date" in out and "would fail line 4" in out
    assert re.search(r"would delete 1 tag\(s\): v1\.26\.0", out), out
    # A repository that cannot be listed fails its line, with the registry's reason.
    (failed,) = [e for e in doc["expansions"] if e["status"] == "failed"]
    assert failed["line"] == 5 and failed["error_code"] == "NAME_UNKNOWN"
    assert re.search(r"line 5: .*k8s/none: listing tags failed: .*repository name not known", out), out


def _config_size(src: Registry, image: Image) -> int:
    doc = httpx.get(f"{src.url}/v2/{image.repo}/manifests/{image.digest}",
                    headers={"Accept": image.media_type}).json()
    return int(doc["config"]["size"])


def test_prune_deletes_exactly_the_unselected_tags_and_no_signature(
        make_cluster: Callable[..., Cluster], dst: Registry, make_registry: Callable[..., Registry],
        source: tuple[FaultProxy, dict[str, Image]]) -> None:
    proxy, _ = source
    c = cluster_with_workers(make_cluster)
    locked = make_registry("locked", delete_enabled=False)
    with Pusher(dst.url) as pusher, Pusher(locked.url) as locked_pusher:
        for tag in ("v1.26.0", "v1.28.0", "old", "latest"):
            push_image(pusher, "pr/app", tag, layers=1, layer_size=256, salt=f"old-{tag}")
        push_image(locked_pusher, "pr/app", "old", layers=1, layer_size=256, salt="old")
        sig = push_image(pusher, "pr/app", f"{SIG}.sig", layers=1, layer_size=64, salt="sig")
        push_image(pusher, "pr/app", SIG, layers=1, layer_size=64, salt="ref")
        push_image(pusher, "other/app", "old", layers=1, layer_size=256, salt="other")
    listing = c.listing([
        f"{SELECTORS[1][0]} {proxy.host}/k8s/app {dst.host}/pr/app",
        f"{proxy.host}/k8s/app:latest {dst.host}/pr/app:latest",   # a plain line into the same repository
        f"--tags=^7$ {proxy.host}/k8s/app {locked.host}/pr/app",
    ])
    r = c.producer("enqueue", str(listing), "--prune", "--wait")
    assert r.returncode == 1, r.stdout + r.stderr  # the locked registry kept its tag
    assert tags_of(dst, "pr/app") == SEMVER | {"latest", SIG, f"{SIG}.sig"}
    assert dst.manifest_digest("pr/app", f"{SIG}.sig") == sig.digest
    assert tags_of(dst, "other/app") == {"old"}  # outside the repositories the list fills
    assert tags_of(locked, "pr/app") == {"old", "7"}
    out = r.stdout + r.stderr
    assert re.search(r"deleted 2 tag\(s\): (v1\.26\.0, old|old, v1\.26\.0)", out), out
    assert re.search(r"line 3: .*pr/app: kept old: the registry refuses deletes .*storage\.delete\.enabled", out), out
