"""Destination mapping: targets, namespaces, flattening, explicit destinations, collisions."""

from __future__ import annotations

import pytest

from config.platform import Platform
from config.reference import InvalidReference
from producer.enqueue import build_jobs, task_id_for
from producer.listfile import ListEntry, ListFileError, parse_list
from producer.mapping import Mapped, Target, map_destinations

SHA = "sha256:" + "c" * 64


def _entries(text: str) -> list[ListEntry]:
    return parse_list(text.encode()).entries


def _map(text: str, targets: list[str], *, flatten: bool = False) -> list[tuple[int, list[str]]]:
    mapped = map_destinations(_entries(text), [Target.parse(t) for t in targets], flatten=flatten)
    return [(m.entry.line, [str(d) for d in m.destinations]) for m in mapped]


@pytest.mark.parametrize(
    ("text", "registry", "namespace", "shown"),
    [
        ("registry.example.com/mirror", "registry.example.com", "mirror", "registry.example.com/mirror"),
        ("registry.example.com", "registry.example.com", "", "registry.example.com"),
        ("registry.example.com/", "registry.example.com", "", "registry.example.com"),
        ("127.0.0.1:5002", "127.0.0.1:5002", "", "127.0.0.1:5002"),
        ("127.0.0.1:5002/", "127.0.0.1:5002", "", "127.0.0.1:5002"),
        ("host:5000/a/b", "host:5000", "a/b", "host:5000/a/b"),
        ("localhost:5000/mirror", "localhost:5000", "mirror", "localhost:5000/mirror"),
        ("[::1]:5000/m", "[::1]:5000", "m", "[::1]:5000/m"),
        ("registry-vpc.cn-hangzhou.aliyuncs.com/team", "registry-vpc.cn-hangzhou.aliyuncs.com", "team", None),
        ("index.docker.io/myorg", "docker.io", "myorg", "docker.io/myorg"),
        ("harbor.example.com:8443/proj/sub-dir", "harbor.example.com:8443", "proj/sub-dir", None),
    ],
)
def test_target_parse(text: str, registry: str, namespace: str, shown: str | None) -> None:
    target = Target.parse(text)
    assert (target.registry, target.namespace) == (registry, namespace)
    assert str(target) == (shown or text)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("https://registry.example.com/mirror", "without a URL scheme"),
        ("registry.example.com/mirror:v1", "drop ':tag'"),
        (f"registry.example.com/mirror@{SHA}", "drop '@digest'"),
        ("registry.example.com/Mirror", "must be lowercase"),
        ("registry.example.com//mirror", "empty path component"),
        ("-bad.example.com/mirror", "not a valid registry"),
        ("bad host/mirror", "not a valid registry"),
        ("registry.example.com/-x", "'-x' is not valid"),
    ],
)
def test_target_parse_rejects(text: str, fragment: str) -> None:
    with pytest.raises(InvalidReference) as info:
        Target.parse(text)
    assert fragment in info.value.reason


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("registry.k8s.io/kube-apiserver:v1.30.0", "T/ns/kube-apiserver:v1.30.0"),
        ("nginx", "T/ns/library/nginx:latest"),
        ("bitnami/redis:7", "T/ns/bitnami/redis:7"),
        (
            "k8s.gcr.io/kube-state-metrics/kube-state-metrics:v2.0.0",
            "T/ns/kube-state-metrics/kube-state-metrics:v2.0.0",
        ),
        (f"ghcr.io/org/app@{SHA}", f"T/ns/org/app@{SHA}"),
        (f"ghcr.io/org/app:v2@{SHA}", f"T/ns/org/app:v2@{SHA}"),
        ("localhost:5000/app:1", "T/ns/app:1"),
    ],
)
def test_source_path_is_kept_under_the_namespace(line: str, expected: str) -> None:
    target = "mirror.example.com:8443/ns"
    ((_, destinations),) = _map(line, [target])
    assert destinations == [expected.replace("T/ns", target)]


@pytest.mark.parametrize(
    ("line", "target", "flatten", "expected"),
    [
        ("registry.k8s.io/kube-apiserver:v1.30.0", "127.0.0.1:5002", False, "127.0.0.1:5002/kube-apiserver:v1.30.0"),
        ("nginx", "127.0.0.1:5002", False, "127.0.0.1:5002/library/nginx:latest"),
        ("nginx", "127.0.0.1:5002/ns", True, "127.0.0.1:5002/ns/nginx:latest"),
        ("nginx", "127.0.0.1:5002", True, "127.0.0.1:5002/nginx:latest"),
        (
            "k8s.gcr.io/kube-state-metrics/kube-state-metrics:v2.0.0",
            "127.0.0.1:5002/ns",
            True,
            "127.0.0.1:5002/ns/kube-state-metrics:v2.0.0",
        ),
        (f"ghcr.io/org/deep/app@{SHA}", "r.example.com/a/b", True, f"r.example.com/a/b/app@{SHA}"),
        # Flattening onto Docker Hub without a namespace still lands under library/.
        ("quay.io/org/app:v1", "docker.io", True, "docker.io/library/app:v1"),
    ],
)
def test_namespace_and_flatten(line: str, target: str, flatten: bool, expected: str) -> None:
    assert _map(line, [target], flatten=flatten) == [(1, [expected])]


def test_one_destination_per_target_in_target_order() -> None:
    got = _map("--platform=linux/arm64 redis:7\nquay.io/a/b:1", ["h1.example.com/m", "127.0.0.1:5002"])
    assert got == [
        (1, ["h1.example.com/m/library/redis:7", "127.0.0.1:5002/library/redis:7"]),
        (2, ["h1.example.com/m/a/b:1", "127.0.0.1:5002/a/b:1"]),
    ]


def test_explicit_destination_wins_over_targets() -> None:
    text = "quay.io/prometheus/node-exporter:v1.8.0  mirror.example.com/infra/node-exporter:v1.8.0\nnginx"
    assert _map(text, ["t1.example.com/x", "t2.example.com"], flatten=True) == [
        (1, ["mirror.example.com/infra/node-exporter:v1.8.0"]),
        (2, ["t1.example.com/x/nginx:latest", "t2.example.com/nginx:latest"]),
    ]
    # Without any target, lines with their own destination still map.
    assert _map("quay.io/a/b:1 127.0.0.1:5002/b", []) == [(1, ["127.0.0.1:5002/b:1"])]


def test_platforms_pass_through() -> None:
    entries = _entries("--platform=linux/amd64,linux/arm/v7 redis:7")
    (mapped,) = map_destinations(entries, [Target.parse("127.0.0.1:5002")], flatten=False)
    assert isinstance(mapped, Mapped)
    assert mapped.entry is entries[0]
    assert mapped.entry.platforms == (Platform("linux", "amd64"), Platform("linux", "arm", "v7"))


def test_no_destination_is_an_error_for_each_line() -> None:
    with pytest.raises(ListFileError) as info:
        _map("nginx\nquay.io/a/b:1 127.0.0.1:5002/b\nredis:7  # cache", [])
    assert [(e.line, e.reason, e.text) for e in info.value.errors] == [
        (1, "no destination: give --target or a destination on the line", "nginx"),
        (3, "no destination: give --target or a destination on the line", "redis:7  # cache"),
    ]
    assert str(info.value).splitlines()[0] == (
        "LINE 1: no destination: give --target or a destination on the line: nginx"
    )


def test_flatten_collision_names_both_lines() -> None:
    text = "# two apps with the same last element\nquay.io/a/app:1\n\nghcr.io/b/app:1\nquay.io/c/app:2\n"
    assert len(_map(text, ["r.example.com/m"])) == 3
    with pytest.raises(ListFileError) as info:
        _map(text, ["r.example.com/m"], flatten=True)
    (error,) = info.value.errors
    assert error.line == 4
    assert error.text == "ghcr.io/b/app:1"
    assert "r.example.com/m/app:1 is also the destination of line 2" in error.reason
    assert "flattening" in error.reason
    assert str(info.value).startswith("LINE 4: destination r.example.com/m/app:1 is also the destination of line 2")


def test_collision_with_each_target_is_reported() -> None:
    text = "quay.io/a/app:1\nghcr.io/b/app:1\n"
    with pytest.raises(ListFileError) as info:
        _map(text, ["one.example.com", "two.example.com/x"], flatten=True)
    assert [(e.line, e.reason.split(" is also")[0]) for e in info.value.errors] == [
        (2, "destination one.example.com/app:1"),
        (2, "destination two.example.com/x/app:1"),
    ]


def test_different_platforms_to_one_destination_collide() -> None:
    text = "--platform=linux/amd64 redis:7\n--platform=linux/arm64 redis:7\n"
    with pytest.raises(ListFileError) as info:
        _map(text, ["127.0.0.1:5002"])
    (error,) = info.value.errors
    assert error.line == 2
    assert "line 1" in error.reason
    assert "each destination can hold only one image" in error.reason


def test_explicit_destination_colliding_with_a_mapped_one() -> None:
    text = "nginx:1\nquay.io/x/nginx:1 127.0.0.1:5002/library/nginx:1\n"
    with pytest.raises(ListFileError) as info:
        _map(text, ["127.0.0.1:5002"], flatten=False)
    (error,) = info.value.errors
    assert (error.line, "line 1" in error.reason) == (2, True)
    assert "flattening" not in error.reason


def test_same_image_written_twice_to_one_destination_is_not_a_collision() -> None:
    # One line maps through the target, the other names the same destination outright.
    text = "nginx:1\nnginx:1 127.0.0.1:5002/library/nginx:1\n"
    assert _map(text, ["127.0.0.1:5002"]) == [
        (1, ["127.0.0.1:5002/library/nginx:1"]),
        (2, ["127.0.0.1:5002/library/nginx:1"]),
    ]


def test_the_same_copy_written_twice_becomes_one_job() -> None:
    # Two jobs would share one task id: the report would count the image twice.
    entries = _entries("nginx:1\nnginx:1 127.0.0.1:5002/library/nginx:1\nredis:7\n")
    jobs = build_jobs("b", map_destinations(entries, [Target.parse("127.0.0.1:5002")], flatten=False), "registry")
    assert [(j.line, j.source) for j in jobs] == [(1, "docker.io/library/nginx:1"), (3, "docker.io/library/redis:7")]
    assert len({task_id_for("b", j) for j in jobs}) == 2


def test_digest_only_destinations_collide_only_on_the_same_digest() -> None:
    other = "sha256:" + "d" * 64
    assert len(_map(f"quay.io/a/app@{SHA}\nghcr.io/b/app@{other}", ["r.example.com"], flatten=True)) == 2
    with pytest.raises(ListFileError):
        _map(f"quay.io/a/app@{SHA}\nghcr.io/b/app@{SHA}", ["r.example.com"], flatten=True)


def test_too_long_destination_is_a_line_error() -> None:
    long_path = "/".join(["abcdefghij"] * 20)
    with pytest.raises(ListFileError) as info:
        _map(f"quay.io/{long_path}:1\nnginx", ["registry.example.com/" + "n" * 60])
    (error,) = info.value.errors
    assert error.line == 1
    assert "cannot build destination" in error.reason
    assert "at most 255" in error.reason


def test_all_mapping_errors_are_collected() -> None:
    text = "quay.io/a/app:1\nghcr.io/b/app:1\nnginx\nquay.io/c/app:1\n"
    entries = _entries(text) + _entries("docker.io/x/y:1")
    with pytest.raises(ListFileError) as info:
        map_destinations(entries, [Target.parse("r.example.com")], flatten=True)
    assert [e.line for e in info.value.errors] == [2, 4]


@pytest.mark.parametrize(("setting", "expected"), [(True, [True, False]), (False, [False, False])])
def test_jobs_carry_referrers_unless_the_line_or_the_setting_turns_them_off(setting: bool,
                                                                           expected: list[bool]) -> None:
    entries = _entries("nginx:1\n--no-referrers redis:7\n")
    mapped = map_destinations(entries, [Target.parse("127.0.0.1:5002")], flatten=False)
    assert [j.referrers for j in build_jobs("b", mapped, "registry", referrers=setting)] == expected
