"""Image references and platforms, checked against docker's own grammar cases.

Most valid/invalid inputs below come from distribution/reference's
reference_test.go and normalize_test.go, with expectations restated for the
normalised form (``docker pull`` semantics) that ferry uses.
"""

from __future__ import annotations

import pickle
import random
from collections.abc import Callable

import pytest

from config.platform import Platform, PlatformError
from config.reference import (
    DIGEST_RE,
    InvalidReference,
    Reference,
    canonical_registry,
    host_is_loopback,
    is_digest,
    normalize_registry,
)

F64 = "f" * 64
SHA = f"sha256:{F64}"
SHA512 = "sha512:" + "f" * 128
BUSYBOX_DIGEST = "sha256:86e0e091d0da6bde2456dbb48306f3956bbeb2eae1b5b9a43045843f69fe4aaa"

# input -> (registry, repository, tag, digest)
VALID: list[tuple[str, tuple[str, str, str | None, str | None]]] = [
    ("test_com", ("docker.io", "library/test_com", "latest", None)),
    ("test.com:tag", ("docker.io", "library/test.com", "tag", None)),
    ("test.com:5000", ("docker.io", "library/test.com", "5000", None)),
    ("test.com/repo:tag", ("test.com", "repo", "tag", None)),
    ("test:5000/repo", ("test:5000", "repo", "latest", None)),
    ("test:5000/repo:tag", ("test:5000", "repo", "tag", None)),
    (f"test:5000/repo@{SHA}", ("test:5000", "repo", None, SHA)),
    (f"test:5000/repo:tag@{SHA}", ("test:5000", "repo", "tag", SHA)),
    ("lowercase:Uppercase", ("docker.io", "library/lowercase", "Uppercase", None)),
    ("sub-dom1.foo.com/bar/baz/quux", ("sub-dom1.foo.com", "bar/baz/quux", "latest", None)),
    ("sub-dom1.foo.com/bar/baz/quux:some-long-tag", ("sub-dom1.foo.com", "bar/baz/quux", "some-long-tag", None)),
    (
        "b.gcr.io/test.example.com/my-app:test.example.com",
        ("b.gcr.io", "test.example.com/my-app", "test.example.com", None),
    ),
    ("xn--n3h.com/myimage:xn--n3h.com", ("xn--n3h.com", "myimage", "xn--n3h.com", None)),
    (
        f"xn--7o8h.com/myimage:xn--7o8h.com@{SHA512}",
        ("xn--7o8h.com", "myimage", "xn--7o8h.com", SHA512),
    ),
    ("foo_bar.com:8080", ("docker.io", "library/foo_bar.com", "8080", None)),
    ("foo/foo_bar.com:8080", ("docker.io", "foo/foo_bar.com", "8080", None)),
    ("192.168.1.1", ("docker.io", "library/192.168.1.1", "latest", None)),
    ("192.168.1.1:tag", ("docker.io", "library/192.168.1.1", "tag", None)),
    ("192.168.1.1:5000", ("docker.io", "library/192.168.1.1", "5000", None)),
    ("192.168.1.1/repo", ("192.168.1.1", "repo", "latest", None)),
    ("192.168.1.1:5000/repo", ("192.168.1.1:5000", "repo", "latest", None)),
    ("192.168.1.1:5000/repo:5050", ("192.168.1.1:5000", "repo", "5050", None)),
    ("[2001:db8::1]/repo", ("[2001:db8::1]", "repo", "latest", None)),
    ("[2001:db8:1:2:3:4:5:6]/repo:tag", ("[2001:db8:1:2:3:4:5:6]", "repo", "tag", None)),
    ("[2001:db8::1]:5000/repo", ("[2001:db8::1]:5000", "repo", "latest", None)),
    ("[2001:db8::1]:5000/repo:tag", ("[2001:db8::1]:5000", "repo", "tag", None)),
    (f"[2001:db8::1]:5000/repo@{SHA}", ("[2001:db8::1]:5000", "repo", None, SHA)),
    (f"[2001:db8::1]:5000/repo:tag@{SHA}", ("[2001:db8::1]:5000", "repo", "tag", SHA)),
    ("[2001:db8::]:5000/repo", ("[2001:db8::]:5000", "repo", "latest", None)),
    ("[::1]:5000/repo", ("[::1]:5000", "repo", "latest", None)),
    # normalize_test.go: Docker Hub spellings and familiar names
    ("docker/docker", ("docker.io", "docker/docker", "latest", None)),
    ("library/debian", ("docker.io", "library/debian", "latest", None)),
    ("debian", ("docker.io", "library/debian", "latest", None)),
    ("docker.io/docker/docker", ("docker.io", "docker/docker", "latest", None)),
    ("docker.io/library/debian", ("docker.io", "library/debian", "latest", None)),
    ("docker.io/debian", ("docker.io", "library/debian", "latest", None)),
    ("index.docker.io/docker/docker", ("docker.io", "docker/docker", "latest", None)),
    ("index.docker.io/library/debian", ("docker.io", "library/debian", "latest", None)),
    ("index.docker.io/debian", ("docker.io", "library/debian", "latest", None)),
    ("registry-1.docker.io/bitnami/redis:7", ("docker.io", "bitnami/redis", "7", None)),
    ("127.0.0.1:5000/docker/docker", ("127.0.0.1:5000", "docker/docker", "latest", None)),
    ("127.0.0.1:5000/debian", ("127.0.0.1:5000", "debian", "latest", None)),
    ("192.168.0.1", ("docker.io", "library/192.168.0.1", "latest", None)),
    ("192.168.0.1:80", ("docker.io", "library/192.168.0.1", "80", None)),
    ("192.168.0.1:8/debian", ("192.168.0.1:8", "debian", "latest", None)),
    (
        "thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev",
        ("docker.io", "library/thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev", "latest", None),
    ),
    ("[fc00::1]:5000/docker", ("[fc00::1]:5000", "docker", "latest", None)),
    ("[fc00:1:2:3:4:5:6:7]:5000/library/debian", ("[fc00:1:2:3:4:5:6:7]:5000", "library/debian", "latest", None)),
    (
        "docker.io/1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a",
        ("docker.io", "library/1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a", "latest", None),
    ),
    # An uppercase first element can only be a host name, as in docker.
    ("Docker/docker", ("Docker", "docker", "latest", None)),
    ("DOCKER/docker", ("DOCKER", "docker", "latest", None)),
    ("docker-rules/docker", ("docker.io", "docker-rules/docker", "latest", None)),
    ("docker---rules/docker", ("docker.io", "docker---rules/docker", "latest", None)),
    ("d/docker", ("docker.io", "d/docker", "latest", None)),
    ("jess/t", ("docker.io", "jess/t", "latest", None)),
    ("dock__er/docker", ("docker.io", "dock__er/docker", "latest", None)),
    ("localhost/foo", ("localhost", "foo", "latest", None)),
    ("localhost:5000/foo/bar:v1", ("localhost:5000", "foo/bar", "v1", None)),
    # A bare "localhost" is a Docker Hub name, exactly as docker treats it.
    ("localhost", ("docker.io", "library/localhost", "latest", None)),
    ("library/foo/bar", ("docker.io", "library/foo/bar", "latest", None)),
    (f"busybox:latest@{BUSYBOX_DIGEST}", ("docker.io", "library/busybox", "latest", BUSYBOX_DIGEST)),
    (f"redis@{BUSYBOX_DIGEST}", ("docker.io", "library/redis", None, BUSYBOX_DIGEST)),
    (
        "k8s.gcr.io/kube-state-metrics/kube-state-metrics:v2.0.0",
        ("k8s.gcr.io", "kube-state-metrics/kube-state-metrics", "v2.0.0", None),
    ),
    ("quay.io/a/b:" + "t" * 128, ("quay.io", "a/b", "t" * 128, None)),
    ("quay.io/a/b@sha384:" + "a" * 96, ("quay.io", "a/b", None, "sha384:" + "a" * 96)),
    ("example.com/" + "a" * 243, ("example.com", "a" * 243, "latest", None)),
]

# input -> a fragment the error message must contain
INVALID: list[tuple[str, str]] = [
    ("", "empty"),
    (":justtag", "start with a name"),
    (f"@{SHA}", "start with a name"),
    ("repo@sha256:" + "f" * 34, "64 hex characters, not 34"),
    (f"validname@invaliddigest:{F64}", "not supported"),
    ("repo@sha256:abc", "not of the form"),
    ("repo@sha256:" + "F" * 64, "lowercase hex"),
    ("repo@sha512:" + "f" * 64, "128 hex characters"),
    (f"repo@{SHA}@{SHA}", "more than one '@'"),
    ("Uppercase:tag", "must be lowercase"),
    ("test:5000/Uppercase/lowercase:tag", "must be lowercase"),
    ("a/" * 128 + "a:tag", "at most 255"),
    ("example.com/" + "a" * 244, "at most 255"),
    ("x" * 5000, "characters long"),
    ("aa/asdf$$^/aa", "'asdf$$^' is not valid"),
    ("[2001:db8::1]", "IPv6"),
    ("[2001:db8::1]:5000", "IPv6"),
    ("[2001:db8::1]:tag", "IPv6"),
    ("[fe80::1%eth0]:5000/repo", "not a valid registry"),
    ("[fe80::1%@invalidzone]:5000/repo", "IPv6"),
    ("https://github.com/docker/docker", "URL scheme"),
    ("docker/Docker", "must be lowercase"),
    ("-docker", "'-docker' is not valid"),
    ("-docker/docker", "'-docker' is not valid"),
    ("-docker.io/docker/docker", "not a valid registry"),
    ("docker///docker", "empty path component"),
    ("docker.io/docker/Docker", "must be lowercase"),
    ("docker.io/docker///docker", "empty path component"),
    ("[fc00::1]", "IPv6"),
    ("[fc00::1]:5000", "IPv6"),
    ("fc00::1:5000/debian", "not a valid registry"),
    ("[2001:db8:3:4::192.0.2.33]:5000/debian", "not a valid registry"),
    ("1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a", "image ID"),
    ("docker-/docker", "'docker-' is not valid"),
    ("-docker-/docker", "'-docker-' is not valid"),
    ("____/____", "'____' is not valid"),
    ("_docker/_docker", "'_docker' is not valid"),
    ("dock..er/docker", "'dock..er' is not a valid registry"),  # '.' makes it a host
    ("dock_.er/docker", "'dock_.er' is not a valid registry"),  # '.' makes it a host
    ("dock-.er/docker", "'dock-.er' is not a valid registry"),  # '.' makes it a host
    ("docker/", "empty path component"),
    ("this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255" * 4 + "/docker", "at most 255"),
    ("nginx:" + "t" * 129, "at most 128"),
    ("nginx:.hidden", "not valid"),
    ("nginx:-dash", "not valid"),
    ("nginx:tagé", "not valid"),  # Go's \w is ASCII only
    ("nginx:", "not valid"),
    ("nginx latest", "whitespace"),
    (" nginx", "whitespace"),
    ("nginx\n", "whitespace"),
    ("/nginx", "start with a name"),
]


@pytest.mark.parametrize(("text", "expected"), VALID, ids=[v[0][:60] for v in VALID])
def test_valid_references_parse_to_their_parts(text: str, expected: tuple[str, str, str | None, str | None]) -> None:
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == expected
    # The canonical and familiar forms parse back to the same reference.
    assert Reference.parse(str(ref)) == ref
    assert Reference.parse(ref.familiar) == ref


@pytest.mark.parametrize(("text", "fragment"), INVALID, ids=[v[0][:60] for v in INVALID])
def test_invalid_references_say_why(text: str, fragment: str) -> None:
    with pytest.raises(InvalidReference) as info:
        Reference.parse(text)
    assert fragment in info.value.reason
    assert isinstance(info.value, ValueError)
    # The message never echoes kilobytes of input back.
    assert len(str(info.value)) < 400


@pytest.mark.parametrize(
    ("text", "name", "canonical", "familiar"),
    [
        ("nginx", "docker.io/library/nginx", "docker.io/library/nginx:latest", "nginx:latest"),
        ("fooo/bar", "docker.io/fooo/bar", "docker.io/fooo/bar:latest", "fooo/bar:latest"),
        ("index.docker.io/fooo/bar", "docker.io/fooo/bar", "docker.io/fooo/bar:latest", "fooo/bar:latest"),
        ("library/ubuntu", "docker.io/library/ubuntu", "docker.io/library/ubuntu:latest", "ubuntu:latest"),
        ("other/library", "docker.io/other/library", "docker.io/other/library:latest", "other/library:latest"),
        ("docker.io/foo:1", "docker.io/library/foo", "docker.io/library/foo:1", "foo:1"),
        (
            "library/foo/bar",
            "docker.io/library/foo/bar",
            "docker.io/library/foo/bar:latest",
            "library/foo/bar:latest",
        ),
        (
            "127.0.0.1:8000/private/moonbase",
            "127.0.0.1:8000/private/moonbase",
            "127.0.0.1:8000/private/moonbase:latest",
            "127.0.0.1:8000/private/moonbase:latest",
        ),
        (
            "example.com/privatebase:v1",
            "example.com/privatebase",
            "example.com/privatebase:v1",
            "example.com/privatebase:v1",
        ),
        (
            f"busybox:latest@{BUSYBOX_DIGEST}",
            "docker.io/library/busybox",
            f"docker.io/library/busybox:latest@{BUSYBOX_DIGEST}",
            f"busybox:latest@{BUSYBOX_DIGEST}",
        ),
        (
            f"ghcr.io/org/app@{SHA}",
            "ghcr.io/org/app",
            f"ghcr.io/org/app@{SHA}",
            f"ghcr.io/org/app@{SHA}",
        ),
    ],
)
def test_name_canonical_and_familiar_forms(text: str, name: str, canonical: str, familiar: str) -> None:
    ref = Reference.parse(text)
    assert ref.name == name
    assert str(ref) == canonical
    assert ref.familiar == familiar


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("nginx", "latest"),
        ("nginx:1.27", "1.27"),
        (f"nginx@{SHA}", SHA),
        # A pinned digest wins over the tag: that is what the registry is asked for.
        (f"nginx:1.27@{SHA}", SHA),
    ],
)
def test_ref_is_what_the_manifest_url_needs(text: str, ref: str) -> None:
    assert Reference.parse(text).ref == ref


@pytest.mark.parametrize(
    ("text", "api_host"),
    [
        ("nginx", "registry-1.docker.io"),
        ("index.docker.io/library/nginx", "registry-1.docker.io"),
        ("registry-1.docker.io/library/nginx", "registry-1.docker.io"),
        ("ghcr.io/org/app", "ghcr.io"),
        ("127.0.0.1:5000/app", "127.0.0.1:5000"),
    ],
)
def test_api_host(text: str, api_host: str) -> None:
    assert Reference.parse(text).api_host == api_host


@pytest.mark.parametrize(
    ("text", "loopback"),
    [
        ("localhost/app", True),
        ("localhost:5000/app", True),
        ("127.0.0.1/app", True),
        ("127.0.0.1:5002/app", True),
        ("127.9.8.7:80/app", True),
        ("[::1]/app", True),
        ("[::1]:5000/app", True),
        ("[0:0:0:0:0:0:0:1]:5000/app", True),
        ("nginx", False),
        ("192.168.1.1:5000/app", False),
        ("128.0.0.1:5000/app", False),
        ("localhost.example.com/app", False),
        ("127.0.0.1.nip.io/app", False),
        ("[2001:db8::1]:5000/app", False),
    ],
)
def test_is_loopback(text: str, loopback: bool) -> None:
    assert Reference.parse(text).is_loopback is loopback
    assert host_is_loopback(Reference.parse(text).registry) is loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("LocalHost:5000", True),
        ("127.0.0.1", True),
        ("127.200.0.1:80", True),
        ("::1", True),
        ("[::1]", True),
        ("[::1]:5000", True),
        # Resolved by whatever DNS is configured, so not trusted as loopback (see host_is_loopback).
        ("app.localhost", False),
        ("app.localhost:5000", False),
        ("localhost.", False),
        ("0.0.0.0", False),
        ("::", False),
        ("[2001:db8::1]", False),
        ("", False),
    ],
)
def test_host_is_loopback_with_or_without_port(host: str, loopback: bool) -> None:
    assert host_is_loopback(host) is loopback


def test_registry_names_fold_docker_hub() -> None:
    # References keep what they name (case included); lookups compare one lower-case key.
    assert normalize_registry("Index.Docker.IO") == "docker.io"
    assert normalize_registry("Registry.Example.com:5000") == "Registry.Example.com:5000"
    assert normalize_registry("registry.hub.docker.com") == "registry.hub.docker.com"
    assert canonical_registry("Registry.Example.com:5000") == "registry.example.com:5000"
    assert [canonical_registry(x) for x in (
        "registry.hub.docker.com", "https://index.docker.io/v1/", " registry-1.docker.io ", "docker.io/library/x",
    )] == ["docker.io"] * 4


def test_with_tag_keeps_the_digest_and_validates() -> None:
    ref = Reference.parse(f"test.com:8000/foo@{SHA}")
    assert str(ref.with_tag("TAG5")) == f"test.com:8000/foo:TAG5@{SHA}"
    assert str(Reference.parse("foo").with_tag("tag2")) == "docker.io/library/foo:tag2"
    assert str(Reference.parse(f"foo:1@{SHA}").with_tag(None)) == f"docker.io/library/foo@{SHA}"
    with pytest.raises(InvalidReference, match="not valid"):
        ref.with_tag("-foo")
    with pytest.raises(InvalidReference, match="needs a tag or a digest"):
        Reference.parse("foo:1").with_tag(None)


def test_with_digest_keeps_the_tag_and_validates() -> None:
    ref = Reference.parse("test.com/foo:v1")
    assert str(ref.with_digest(SHA)) == f"test.com/foo:v1@{SHA}"
    assert ref.with_digest(SHA).ref == SHA
    with pytest.raises(InvalidReference, match="not of the form"):
        ref.with_digest("foo")


def test_with_name_normalises_docker_hub() -> None:
    ref = Reference.parse(f"quay.io/org/app:v1@{SHA}")
    moved = ref.with_name("registry.example.com:8443", "mirror/org/app")
    assert str(moved) == f"registry.example.com:8443/mirror/org/app:v1@{SHA}"
    assert str(ref.with_name("index.docker.io", "app")) == f"docker.io/library/app:v1@{SHA}"
    with pytest.raises(InvalidReference, match="lowercase"):
        ref.with_name("example.com", "Org/app")
    with pytest.raises(InvalidReference, match="at most 255"):
        ref.with_name("example.com", "a" * 250)


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        (("index.docker.io", "library/x", "latest", None), "write Docker Hub as 'docker.io'"),
        (("docker.io", "library/x", None, None), "needs a tag or a digest"),
        (("", "x", "latest", None), "registry host is empty"),
        (("bad host", "x", "latest", None), "not a valid registry"),
        (("example.com", "", "latest", None), "repository name is empty"),
    ],
)
def test_direct_construction_is_validated(fields: tuple[str, str, str | None, str | None], fragment: str) -> None:
    with pytest.raises(InvalidReference) as info:
        Reference(*fields)
    assert fragment in info.value.reason


def test_references_are_hashable_values() -> None:
    assert Reference.parse("nginx") == Reference.parse("docker.io/library/nginx:latest")
    assert len({Reference.parse("nginx"), Reference.parse("index.docker.io/nginx:latest")}) == 1


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        (SHA, True),
        ("sha512:" + "0" * 128, True),
        ("sha384:" + "0" * 96, True),
        ("sha256:" + "F" * 64, False),
        ("sha256:" + "f" * 63, False),
        ("sha256:" + "f" * 65, False),
        (SHA + "\n", False),
        ("md5:" + "f" * 32, False),
        ("sha256:../../" + "f" * 58, False),
        ("", False),
    ],
)
def test_is_digest(text: str, valid: bool) -> None:
    assert is_digest(text) is valid
    assert (DIGEST_RE.match(text) is not None) is valid


@pytest.mark.parametrize(
    ("text", "expected", "shown"),
    [
        ("linux/amd64", ("linux", "amd64", None), "linux/amd64"),
        ("linux/arm64/v8", ("linux", "arm64", "v8"), "linux/arm64/v8"),
        ("linux/arm/v7", ("linux", "arm", "v7"), "linux/arm/v7"),
        ("linux/arm/v6", ("linux", "arm", "v6"), "linux/arm/v6"),
        ("linux/aarch64", ("linux", "arm64", None), "linux/arm64"),
        ("linux/x86_64", ("linux", "amd64", None), "linux/amd64"),
        ("linux/x86-64", ("linux", "amd64", None), "linux/amd64"),
        ("linux/arm64/8", ("linux", "arm64", "v8"), "linux/arm64/v8"),
        ("linux/armhf", ("linux", "arm", "v7"), "linux/arm/v7"),
        ("linux/i386", ("linux", "386", None), "linux/386"),
        ("linux/amd64/v3", ("linux", "amd64", "v3"), "linux/amd64/v3"),
        ("linux/s390x", ("linux", "s390x", None), "linux/s390x"),
        ("linux/ppc64le", ("linux", "ppc64le", None), "linux/ppc64le"),
        ("windows/amd64", ("windows", "amd64", None), "windows/amd64"),
    ],
)
def test_platform_parse(text: str, expected: tuple[str, str, str | None], shown: str) -> None:
    platform = Platform.parse(text)
    assert (platform.os, platform.architecture, platform.variant) == expected
    assert str(platform) == shown
    assert Platform.parse(shown) == platform


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("linux", "os/architecture"),
        ("linux/", "''"),
        ("/amd64", "''"),
        ("linux//amd64", "''"),
        ("linux/amd64/", "''"),
        ("Linux/amd64", "'Linux'"),
        ("linux/AMD64", "'AMD64'"),
        ("linux/amd 64", "'amd 64'"),
        ("linux/arm64/v8/extra", "too many"),
        ("linux/-arm", "'-arm'"),
    ],
)
def test_platform_parse_rejects(text: str, fragment: str) -> None:
    with pytest.raises(PlatformError) as info:
        Platform.parse(text)
    assert fragment in info.value.reason
    assert isinstance(info.value, ValueError)


def test_platform_direct_construction_normalises_and_validates() -> None:
    assert Platform("linux", "aarch64") == Platform.parse("linux/arm64")
    with pytest.raises(PlatformError, match="architecture"):
        Platform("linux", "")


@pytest.mark.parametrize(
    ("filter_", "descriptor", "matches"),
    [
        ("linux/amd64", {"os": "linux", "architecture": "amd64"}, True),
        ("linux/amd64", {"os": "linux", "architecture": "x86_64"}, True),
        ("linux/amd64", {"os": "linux", "architecture": "arm64"}, False),
        ("linux/amd64", {"os": "windows", "architecture": "amd64"}, False),
        ("linux/amd64", {"os": "linux", "architecture": "amd64", "variant": "v3"}, True),
        ("linux/amd64/v3", {"os": "linux", "architecture": "amd64"}, False),
        ("linux/amd64/v1", {"os": "linux", "architecture": "amd64"}, True),
        ("linux/arm64", {"os": "linux", "architecture": "arm64", "variant": "v8"}, True),
        ("linux/arm64", {"os": "linux", "architecture": "aarch64"}, True),
        ("linux/arm64/v8", {"os": "linux", "architecture": "arm64"}, True),
        ("linux/arm64/v8", {"os": "linux", "architecture": "aarch64"}, True),
        ("linux/arm64/v8", {"os": "linux", "architecture": "arm64", "variant": "8"}, True),
        ("linux/arm64/v8", {"os": "linux", "architecture": "arm64", "variant": ""}, True),
        ("linux/arm64/v9", {"os": "linux", "architecture": "arm64"}, False),
        ("linux/arm", {"os": "linux", "architecture": "arm", "variant": "v6"}, True),
        ("linux/arm", {"os": "linux", "architecture": "arm", "variant": "v7"}, True),
        ("linux/arm/v7", {"os": "linux", "architecture": "arm"}, True),
        ("linux/arm/v7", {"os": "linux", "architecture": "arm", "variant": "v6"}, False),
        ("linux/arm/v6", {"os": "linux", "architecture": "arm"}, False),
        ("linux/arm/v7", {"os": "linux", "architecture": "arm64", "variant": "v8"}, False),
        # Attestation manifests in buildx indexes say unknown/unknown.
        ("linux/amd64", {"os": "unknown", "architecture": "unknown"}, False),
        ("linux/amd64", {"architecture": "amd64"}, False),
        ("linux/amd64", {"os": "linux", "architecture": 64}, False),
        ("linux/arm/v7", {"os": "linux", "architecture": "arm", "variant": 7}, False),
        ("linux/amd64", {}, False),
    ],
)
def test_platform_matches(filter_: str, descriptor: dict[str, object], matches: bool) -> None:
    assert Platform.parse(filter_).matches(descriptor) is matches


def test_errors_survive_pickling() -> None:
    with pytest.raises(InvalidReference) as ref_info:
        Reference.parse("Bad")
    copy = pickle.loads(pickle.dumps(ref_info.value))
    assert (type(copy), copy.text, copy.reason, str(copy)) == (
        InvalidReference,
        "Bad",
        ref_info.value.reason,
        str(ref_info.value),
    )
    with pytest.raises(PlatformError) as plat_info:
        Platform.parse("linux")
    plat_copy = pickle.loads(pickle.dumps(plat_info.value))
    assert (plat_copy.text, plat_copy.reason) == ("linux", plat_info.value.reason)


def _outcome(parse: Callable[[str], Reference], text: str) -> object:
    try:
        return parse(text)
    except InvalidReference as exc:
        return ("error", exc.reason)


def _corpus() -> list[str]:
    rng = random.Random(20240601)
    pieces = [
        "a",
        "b",
        "z9",
        "B",
        ".",
        "-",
        "_",
        "__",
        ":",
        "/",
        "@",
        "5000",
        "localhost",
        "docker.io",
        "library",
        "index.docker.io",
        "x.y",
        "[::1]",
        "v1.2",
        SHA,
        "sha256:",
        "sha512:",
        "f" * 64,
    ]
    texts = [v[0] for v in VALID] + [v[0] for v in INVALID]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))) for _ in range(20_000)]
    return texts


def test_fast_path_agrees_with_the_full_grammar() -> None:
    # parse() answers common shapes with one regex; it must never differ from the full rules.
    parsed = 0
    for text in _corpus():
        outcome = _outcome(Reference.parse, text)
        assert outcome == _outcome(Reference._parse_full, text), text
        parsed += isinstance(outcome, Reference)
    assert parsed > 1000  # the corpus exercises both valid and invalid shapes
