"""Tag selectors and their list-file syntax. Expected sets are written from the selector rules in
README ("The list"), not computed by the code under test."""

from __future__ import annotations

import pytest

from config.selectors import SelectorError, TagSelector, is_referrer_tag
from producer.listfile import ListFileError, parse_list

SIG = "sha256-" + "ab" * 32
# The acceptance repository: releases with and without "v", pre-releases, and tags that are not semver.
TAGS = [
    "v1.27.9", "v1.28.0", "v1.28.4", "v1.29.0-rc.1", "v1.29.0-rc.2", "v1.29.1", "v1.30.0", "v1.30.1",
    "1.30.2", "v1.31.0-alpha.0", "v1.31.0", "latest", "stable", "2024-05-01", "sha-abc123", "7", "7.2",
    "7.0.0", "7.2.4", "7.2.5-rc.1", "7.4.0", "8.0.0-beta.1", "v2", "main", "edge", "nightly-20240501",
    SIG, f"{SIG}.sig", f"{SIG}.att", f"{SIG}.sbom",
]


def select(line: str) -> set[str]:
    (entry,) = parse_list(f"{line} example.com/repo\n".encode()).entries
    assert entry.selector is not None
    return set(entry.selector.select(TAGS))


@pytest.mark.parametrize(("options", "expected"), [
    (r"--tags=^v1\.30\.[0-9]+$", {"v1.30.0", "v1.30.1"}),
    # Full match: "v1.3" alone is no tag here, so nothing starting with it is taken.
    (r"--tags=v1\.3", set()),
    (r"--tags=v1\.30\..* --tags=1\.30\..*", {"v1.30.0", "v1.30.1", "1.30.2"}),
    ('--semver=">=1.28 <1.31"', {"v1.28.0", "v1.28.4", "v1.29.1", "v1.30.0", "v1.30.1", "1.30.2"}),
    ("--semver='>= 1.28 < 1.31'", {"v1.28.0", "v1.28.4", "v1.29.1", "v1.30.0", "v1.30.1", "1.30.2"}),
    # A range naming a pre-release takes that MAJOR.MINOR.PATCH's pre-releases, no others.
    ('--semver=">=1.29.0-rc.2 <1.32"', {"v1.29.0-rc.2", "v1.29.1", "v1.30.0", "v1.30.1", "1.30.2", "v1.31.0"}),
    ('--semver=">=7"', {"7.0.0", "7.2.4", "7.4.0"}),
    ('--semver=">=7" --latest=3', {"7.0.0", "7.2.4", "7.4.0"}),
    ('--semver=">=7" --latest=2', {"7.2.4", "7.4.0"}),
    ("--semver=^1.30", {"v1.30.0", "v1.30.1", "1.30.2", "v1.31.0"}),
    ("--semver=~1.30", {"v1.30.0", "v1.30.1", "1.30.2"}),
    ('--semver="<1.28 || >=8"', {"v1.27.9"}),
    ("--latest=2", {"7.4.0", "7.2.4"}),
    (r"--tags=v1\..* --latest=2", {"v1.31.0", "v1.30.1"}),
    ("--all-tags --exclude-tags=-rc", set(TAGS) - {"v1.29.0-rc.1", "v1.29.0-rc.2", "7.2.5-rc.1",
                                                   SIG, f"{SIG}.sig", f"{SIG}.att", f"{SIG}.sbom"}),
    ("--exclude-tags=^v --exclude-tags=[.-]", {"latest", "stable", "7", "main", "edge"}),
    # --latest counts versions after the other selectors: v1.31.0 is excluded first.
    ("--all-tags --exclude-tags=^v1.31 --latest=1", {"7.4.0"}),
    (r"--tags=.*1\.3.* --exclude-tags=alpha --latest=1", {"v1.31.0"}),
])
def test_selectors_pick_exactly_the_expected_tags(options: str, expected: set[str]) -> None:
    assert select(options) == expected


def test_signature_and_referrer_tags_are_never_selected() -> None:
    assert is_referrer_tag(SIG) and is_referrer_tag(f"{SIG}.sig") and not is_referrer_tag("sha-abc123")
    assert not {t for t in select("--all-tags") if t.startswith("sha256-")}
    assert select("--tags=sha256-.*") == set()


def test_latest_counts_versions_not_spellings() -> None:
    both = TagSelector.of(latest=1).select(["v1.0.0", "1.0.0", "0.9.0"])
    assert set(both) == {"v1.0.0", "1.0.0"}


def test_selected_tags_come_highest_version_first() -> None:
    sel = TagSelector.of(all_tags=True)
    assert sel.select(["a", "v1.2.0", "1.10.0", "1.2.0-rc.1", "b"]) == ["1.10.0", "v1.2.0", "1.2.0-rc.1", "a", "b"]


def test_selector_survives_the_task_payload() -> None:
    sel = TagSelector.of(tags=["^v1$"], semver=">=1", latest=2, exclude=["rc"])
    assert TagSelector.model_validate_json(sel.model_dump_json()) == sel


@pytest.mark.parametrize(("line", "reason"), [
    ("--tags=[ redis", "invalid --tags regex '['"),
    ("--exclude-tags=(x redis", "invalid --exclude-tags regex"),
    ('--semver=">>1" redis', "invalid --semver range '>>1'"),
    ('--semver="" redis', "empty --semver value"),
    ("--latest=0 redis", "--latest=0: keep at least 1 version"),
    ("--latest=-1 redis", "give a whole number"),
    ("--latest=three redis", "give a whole number"),
    ("--tags=x redis:7", "drop ':tag' from the source"),
    ("--semver=1 redis@sha256:" + "a" * 64, "pinned to a digest"),
    ("--tags=x redis example.com/r:1", "drop ':tag' from the destination"),
    ("--all-tags --semver=1 redis", "--all-tags selects every tag"),
    ("--all-tags=yes redis", "--all-tags takes no value"),
    ("--semver=1 --semver=2 redis", "--semver given twice"),
    ("--latest=1 --latest=2 redis", "--latest given twice"),
    ('--semver=">=1 redis', 'unterminated " quote'),
])
def test_bad_selectors_are_line_errors(line: str, reason: str) -> None:
    with pytest.raises(ListFileError) as caught:
        parse_list(f"nginx\n{line}\n".encode())
    (error,) = caught.value.errors
    assert error.line == 2
    assert reason in error.reason, error.reason


def test_selector_lines_keep_platforms_and_explicit_repository() -> None:
    (entry,) = parse_list(b"--platform=linux/arm64 --semver '>=1.28 <1.31' k8s.io/kube-proxy reg.example/infra/kp\n"
                          ).entries
    assert entry.selector == TagSelector.of(semver=">=1.28 <1.31")
    assert [str(p) for p in entry.platforms] == ["linux/arm64"]
    assert entry.destination is not None and entry.destination.name == "reg.example/infra/kp"
    assert entry.source.name == "k8s.io/kube-proxy"


def test_selector_errors_are_plain_value_errors() -> None:
    with pytest.raises(SelectorError):
        TagSelector.of(semver="not a range")
