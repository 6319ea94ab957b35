"""The list file parser: accepted lines, every kind of mistake, size limits."""

from __future__ import annotations

import pickle
import time

import pytest

from config.platform import Platform
from config.reference import Reference
from producer.listfile import LineError, ListEntry, ListFileError, parse_list

SHA = "sha256:" + "a" * 64
# The README: a 100,000-line list takes 1.3-2.2 s of CPU on a busy 2-core machine; held under this.
PARSE_100K_CPU_S = 3.0

SAMPLE = f"""\
# comment, blank lines ignored

nginx                                   # docker.io/library/nginx:latest
k8s.gcr.io/kube-state-metrics/kube-state-metrics:v2.0.0
--platform=linux/arm64 xiaoyaliu/alist  # only that platform
--platform=linux/amd64,linux/arm64 redis:7
ghcr.io/org/app@{SHA}         # digest pin
quay.io/prometheus/node-exporter:v1.8.0  mirror.example.com/infra/node-exporter:v1.8.0   # explicit
--platform linux/arm/v7 busybox:1.36
\tregistry.k8s.io/pause:3.9\t
""".encode()


def _errors(data: bytes, **kwargs: int) -> list[LineError]:
    with pytest.raises(ListFileError) as info:
        parse_list(data, **kwargs)
    return info.value.errors


def test_sample_list_parses_into_entries() -> None:
    parsed = parse_list(SAMPLE)
    assert parsed.warnings == []
    got = [
        (e.line, str(e.source), str(e.destination) if e.destination else None, [str(p) for p in e.platforms])
        for e in parsed.entries
    ]
    assert got == [
        (3, "docker.io/library/nginx:latest", None, []),
        (4, "k8s.gcr.io/kube-state-metrics/kube-state-metrics:v2.0.0", None, []),
        (5, "docker.io/xiaoyaliu/alist:latest", None, ["linux/arm64"]),
        (6, "docker.io/library/redis:7", None, ["linux/amd64", "linux/arm64"]),
        (7, f"ghcr.io/org/app@{SHA}", None, []),
        (
            8,
            "quay.io/prometheus/node-exporter:v1.8.0",
            "mirror.example.com/infra/node-exporter:v1.8.0",
            [],
        ),
        (9, "docker.io/library/busybox:1.36", None, ["linux/arm/v7"]),
        (10, "registry.k8s.io/pause:3.9", None, []),
    ]
    first = parsed.entries[0]
    assert first.text == "nginx                                   # docker.io/library/nginx:latest"
    assert isinstance(first, ListEntry)
    assert first.platforms == ()
    assert parsed.entries[2].platforms == (Platform("linux", "arm64"),)


@pytest.mark.parametrize(
    ("line", "source", "destination"),
    [
        # A destination without tag or digest takes the source's.
        ("quay.io/a/b:v1 mirror.example.com/x/b", "quay.io/a/b:v1", "mirror.example.com/x/b:v1"),
        (f"quay.io/a/b@{SHA} mirror.example.com/x/b", f"quay.io/a/b@{SHA}", f"mirror.example.com/x/b@{SHA}"),
        (
            f"quay.io/a/b:v1@{SHA} mirror.example.com/x/b",
            f"quay.io/a/b:v1@{SHA}",
            f"mirror.example.com/x/b:v1@{SHA}",
        ),
        ("nginx 127.0.0.1:5002/mirror/nginx", "docker.io/library/nginx:latest", "127.0.0.1:5002/mirror/nginx:latest"),
        # An explicit destination tag is kept, even when it differs.
        ("quay.io/a/b:v1 mirror.example.com/x/b:stable", "quay.io/a/b:v1", "mirror.example.com/x/b:stable"),
        ("quay.io/a/b:v1 localhost:5000/b", "quay.io/a/b:v1", "localhost:5000/b:v1"),
        ("redis:7 myuser/redis", "docker.io/library/redis:7", "docker.io/myuser/redis:7"),
    ],
)
def test_explicit_destinations(line: str, source: str, destination: str) -> None:
    (entry,) = parse_list(line.encode()).entries
    assert str(entry.source) == source
    assert str(entry.destination) == destination


@pytest.mark.parametrize(
    ("line", "platforms"),
    [
        ("--platform=linux/amd64 nginx", ["linux/amd64"]),
        ("--platform linux/amd64 nginx", ["linux/amd64"]),
        ("--platform=linux/amd64,linux/arm64/v8 nginx", ["linux/amd64", "linux/arm64/v8"]),
        ("--platform=linux/amd64 --platform=linux/arm64 nginx", ["linux/amd64", "linux/arm64"]),
        # Repeats collapse; aliases fold into one spelling.
        ("--platform=linux/amd64,linux/x86_64,linux/amd64 nginx", ["linux/amd64"]),
        ("nginx --platform=linux/aarch64", ["linux/arm64"]),
    ],
)
def test_platform_options(line: str, platforms: list[str]) -> None:
    (entry,) = parse_list(line.encode()).entries
    assert [str(p) for p in entry.platforms] == platforms


@pytest.mark.parametrize(
    ("line", "referrers"),
    [("nginx", True), ("--no-referrers nginx", False), ("--platform=linux/arm64 --no-referrers redis:7", False),
     ("redis:7 mirror.example.com/r:7", True)],
)
def test_no_referrers_option(line: str, referrers: bool) -> None:
    (entry,) = parse_list(line.encode()).entries
    assert entry.referrers is referrers


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("Nginx:latest", "bad source reference: repository name 'library/Nginx' must be lowercase"),
        ("nginx:-bad", "bad source reference: tag '-bad' is not valid"),
        ("nginx#nocomment", "bad source reference"),
        ("nginx registry.example.com/Bad/nginx", "bad destination reference"),
        ("--pull=always nginx", "unknown option '--pull'"),
        ("--platform=linux nginx", "bad platform 'linux'"),
        ("--platform=Linux/amd64 nginx", "bad platform 'Linux/amd64'"),
        ("--platform= nginx", "empty --platform value"),
        ("--platform=linux/amd64, nginx", "empty platform in --platform=linux/amd64,"),
        ("--platform=,linux/amd64 nginx", "empty platform"),
        ("--platform", "--platform needs a value"),
        ("--platform=linux/amd64", "missing image after options"),
        ("--platform linux/amd64", "missing image after options"),
        ("a b c", "more than two fields"),
        ("--no-referrers=yes nginx", "--no-referrers takes no value"),
        ("--no-referrers", "missing image after options"),
        (f"ghcr.io/a/b@{SHA} mirror.example.com/b@sha256:{'b' * 64}", "destination digest differs"),
    ],
)
def test_bad_lines_are_reported(line: str, reason: str) -> None:
    (error,) = _errors(f"# header\n{line}\n".encode())
    assert error.line == 2
    assert reason in error.reason
    assert error.text == (line if len(line) <= 80 else line[:77] + "...")


def test_all_errors_are_collected_in_one_raise() -> None:
    data = b"nginx\nBAD\n--nope redis\n\n# fine\nredis:7\nx y z\n"
    errors = _errors(data)
    assert [e.line for e in errors] == [2, 3, 7]
    text = str(ListFileError(errors))
    assert text.splitlines() == [
        "LINE 2: bad source reference: repository name 'library/BAD' must be lowercase: BAD",
        "LINE 3: unknown option '--nope' (understood: --platform, --no-referrers, --tags, --semver, --latest, "
        "--all-tags, --exclude-tags): --nope redis",
        "LINE 7: more than two fields: expected [--platform=...] SOURCE [DESTINATION]: x y z",
    ]


@pytest.mark.parametrize(
    "data",
    [b"", b"\n\n", b"# only a comment\n   # another\n\t\n", b"\xef\xbb\xbf# bom and comment\n"],
)
def test_empty_list_is_one_error(data: bytes) -> None:
    (error,) = _errors(data)
    assert (error.line, error.reason) == (0, "no images in list")
    assert str(error) == "LINE 0: no images in list"


def test_non_utf8_names_the_line() -> None:
    data = b"nginx\nredis:7\nbusy\xffbox\nalpine\n\xc3\n"
    errors = _errors(data)
    assert [(e.line, e.reason) for e in errors] == [
        (3, "not valid UTF-8 (byte 5 of the line)"),
        (5, "not valid UTF-8 (byte 1 of the line)"),
    ]
    assert errors[0].text == "busy\ufffdbox"


def test_crlf_bom_and_tabs_are_accepted() -> None:
    data = b"\xef\xbb\xbfnginx\r\n\t--platform=linux/amd64\tredis:7  # c\r\nalpine"
    parsed = parse_list(data)
    assert [str(e.source) for e in parsed.entries] == [
        "docker.io/library/nginx:latest",
        "docker.io/library/redis:7",
        "docker.io/library/alpine:latest",
    ]
    assert parsed.entries[1].text == "--platform=linux/amd64\tredis:7  # c"


def test_hash_inside_a_word_is_not_a_comment() -> None:
    # "#" only starts a comment at the start of a line or after whitespace.
    parsed = parse_list(b"#nginx\nredis:7 #comment\nalpine\t#x")
    assert [str(e.source) for e in parsed.entries] == ["docker.io/library/redis:7", "docker.io/library/alpine:latest"]


def test_exact_duplicates_collapse_with_a_warning() -> None:
    data = (
        b"nginx\n"
        b"redis:7\n"
        b"docker.io/library/nginx:latest   # same image, other spelling\n"
        b"--platform=linux/arm64 redis:7\n"
        b"--platform=linux/arm64 redis:7\n"
        b"nginx mirror.example.com/nginx\n"
        b"nginx mirror.example.com/nginx:latest\n"
        b"--platform=linux/amd64,linux/arm64 alpine\n"
        b"--platform=linux/arm64,linux/amd64 alpine\n"
    )
    parsed = parse_list(data)
    assert [e.line for e in parsed.entries] == [1, 2, 4, 6, 8]
    assert len(parsed.warnings) == 4
    assert parsed.warnings[0].startswith("line 3 repeats line 1 (docker.io/library/nginx:latest")
    assert parsed.warnings[1].startswith("line 5 repeats line 4 ")
    assert parsed.warnings[2].startswith("line 7 repeats line 6 ")
    assert parsed.warnings[3].startswith("line 9 repeats line 8 ")


def test_over_long_line_is_reported_truncated() -> None:
    data = b"nginx\n" + b"a" * (1024 * 1024) + b"\nredis\n"
    started = time.perf_counter()
    (error,) = _errors(data)
    assert time.perf_counter() - started < 1.0
    assert error.line == 2
    assert error.reason == "line is 1048576 bytes long; at most 4096 allowed"
    assert len(error.text) <= 80
    assert len(str(ListFileError([error]))) < 200


def test_line_length_limit_is_configurable() -> None:
    assert len(parse_list(b"a" * 20, max_line_length=20).entries) == 1
    (error,) = _errors(b"a" * 21, max_line_length=20)
    assert "21 bytes long; at most 20" in error.reason


def test_one_mebibyte_line_within_the_limit_parses_fast() -> None:
    # A huge legal-length line of junk must not trigger regex backtracking.
    line = "--platform=linux/amd64 " + "a-" * (512 * 1024) + "!"
    started = time.perf_counter()
    (error,) = _errors(line.encode(), max_line_length=2 * 1024 * 1024)
    assert time.perf_counter() - started < 1.0
    assert "characters long" in error.reason
    assert len(str(ListFileError([error]))) < 400


def test_too_many_lines() -> None:
    data = b"# header\n" + b"nginx:1\nnginx:2\nnginx:3\n"
    assert len(parse_list(data, max_lines=3).entries) == 3
    (error,) = _errors(data, max_lines=2)
    assert error.line == 4
    assert "more than 2 images" in error.reason


def test_long_error_text_is_truncated_for_display() -> None:
    line = "nginx " + "x" * 200
    error = LineError(1, line, "why")
    assert len(error.text) == 80
    assert error.text.endswith("...")


@pytest.mark.measure
def test_hundred_thousand_lines_parse_quickly() -> None:
    lines = [
        f"--platform=linux/amd64 registry.example.com/team{i % 97}/app-{i}:v{i}.0  # comment {i}"
        if i % 3 == 0
        else f"quay.io/org/image{i}@sha256:{i:064x}"
        if i % 3 == 1
        else f"image{i}:1.{i}"
        for i in range(100_000)
    ]
    data = "\n".join(lines).encode()
    # CPU time, not wall time: on a shared machine other processes' load would be measured too.
    started = time.process_time()
    parsed = parse_list(data)
    elapsed = time.process_time() - started
    assert len(parsed.entries) == 100_000
    assert str(parsed.entries[-3].source) == f"quay.io/org/image99997@sha256:{99997:064x}"
    assert [str(p) for p in parsed.entries[-1].platforms] == ["linux/amd64"]
    print(f"\nREADME (parse): 100,000 lines parsed in {elapsed:.2f} s of CPU")
    assert elapsed < PARSE_100K_CPU_S, elapsed


def test_hundred_thousand_bad_lines_are_all_reported() -> None:
    data = b"\n".join(b"BAD%d" % i for i in range(100_000))
    started = time.process_time()
    errors = _errors(data)
    assert time.process_time() - started < 2 * PARSE_100K_CPU_S
    assert len(errors) == 100_000
    assert errors[-1].line == 100_000


def test_entries_are_value_objects() -> None:
    (a,) = parse_list(b"nginx").entries
    assert a == ListEntry(1, "nginx", Reference.parse("nginx"))


def test_list_file_error_survives_pickling() -> None:
    errors = _errors(b"BAD\n--x y\n")
    copy = pickle.loads(pickle.dumps(ListFileError(errors)))
    assert copy.errors == errors
    assert str(copy) == str(ListFileError(errors))
