"""Tag selectors: which tags of a repository a list line mirrors.

    --tags=REGEX          keep tags the regex matches whole (repeatable: any of them)
    --semver=RANGE        keep semver tags inside an npm-style range (">=1.28 <1.31", "^7", "~1.30")
    --latest=N            of the tags kept so far, the N highest semver versions
    --all-tags            every tag
    --exclude-tags=REGEX  drop tags the regex matches anywhere in (repeatable)

Semver is strict MAJOR.MINOR.PATCH[-PRERELEASE], optionally written with a leading ``v``;
``7.2`` or ``latest`` are not versions and never match ``--semver`` or count for ``--latest``.
Ranges follow npm: partial versions fill with zeros (``>=7`` is ``>=7.0.0``) and a pre-release
matches only when the range names a pre-release of the same MAJOR.MINOR.PATCH.

Referrer and signature tags (``sha256-<hex>``, ``sha256-<hex>.sig/.att/.sbom``) belong to the
image they describe and are never selected. Pure functions only: listing happens on workers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

import semantic_version
from pydantic import BaseModel, ConfigDict, PositiveInt, model_validator

REFERRER_TAG_RE = re.compile(r"sha256-[0-9a-f]{64}(?:\.(?:sig|att|sbom))?")
_OPERATOR_GAP_RE = re.compile(r"(>=|<=|>|<|=|~|\^)\s+")
# A "v" before a version number inside a range: ">=v1.28" means ">=1.28".
_RANGE_V_RE = re.compile(r"(?<![0-9A-Za-z.+-])[vV](?=[0-9xX*])")


class SelectorError(ValueError):
    """A selector that cannot be used, with the reason in words."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)

    def __reduce__(self) -> tuple[type[SelectorError], tuple[str]]:
        return (type(self), (self.reason,))


def is_referrer_tag(tag: str) -> bool:
    """Tags that hold signatures, attestations, SBOMs or a referrers index of another manifest."""
    return REFERRER_TAG_RE.fullmatch(tag) is not None


@lru_cache(maxsize=4096)
def tag_version(tag: str) -> semantic_version.Version | None:
    """The semver version a tag spells (``v1.30.0`` and ``1.30.0`` alike), or None."""
    text = tag[1:] if tag[:1] in ("v", "V") else tag
    try:
        return semantic_version.Version(text)
    except ValueError:
        return None


@lru_cache(maxsize=256)
def parse_range(text: str) -> semantic_version.NpmSpec:
    """An npm-style range; SelectorError with the reason when it is not one."""
    if not text.strip():
        raise SelectorError("empty --semver range")
    normalized = _RANGE_V_RE.sub("", _OPERATOR_GAP_RE.sub(r"\1", " ".join(text.split())))
    try:
        return semantic_version.NpmSpec(normalized)
    except ValueError as exc:
        raise SelectorError(f"invalid --semver range {text!r}: {exc}") from None


@lru_cache(maxsize=1024)
def compile_regex(pattern: str, option: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise SelectorError(f"invalid {option} regex {pattern!r}: {exc}") from None


class TagSelector(BaseModel):
    """What one list line asks for; valid by construction (raises SelectorError otherwise)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tags: tuple[str, ...] = ()
    semver: str | None = None
    latest: PositiveInt | None = None
    all_tags: bool = False
    exclude: tuple[str, ...] = ()

    @classmethod
    def of(cls, *, tags: Iterable[str] = (), semver: str | None = None, latest: int | None = None,
           all_tags: bool = False, exclude: Iterable[str] = ()) -> TagSelector:
        """Build one, raising SelectorError (not a pydantic error) with a reason a person can act on."""
        if latest is not None and latest < 1:
            raise SelectorError(f"--latest={latest}: keep at least 1 version")
        selector = cls.model_construct(tags=tuple(tags), semver=semver, latest=latest, all_tags=all_tags,
                                       exclude=tuple(exclude))
        selector.check()
        return selector

    @model_validator(mode="after")
    def _check(self) -> TagSelector:
        self.check()
        return self

    def check(self) -> None:
        for pattern in self.tags:
            compile_regex(pattern, "--tags")
        for pattern in self.exclude:
            compile_regex(pattern, "--exclude-tags")
        if self.semver is not None:
            parse_range(self.semver)
        if self.all_tags and (self.tags or self.semver is not None):
            raise SelectorError("--all-tags selects every tag; drop it or the --tags/--semver beside it")

    def select(self, tags: Iterable[str]) -> list[str]:
        """The tags this selector keeps, highest version first, then the rest by name."""
        kept = [t for t in dict.fromkeys(tags) if not is_referrer_tag(t)]
        if self.tags:
            allow = [compile_regex(p, "--tags") for p in self.tags]
            kept = [t for t in kept if any(r.fullmatch(t) for r in allow)]
        if self.semver is not None:
            spec = parse_range(self.semver)
            kept = [t for t in kept if (v := tag_version(t)) is not None and spec.match(v)]
        if self.exclude:
            deny = [compile_regex(p, "--exclude-tags") for p in self.exclude]
            kept = [t for t in kept if not any(r.search(t) for r in deny)]
        if self.latest is not None:
            # Pre-releases that got this far passed a --semver range that names them.
            versions = {t: v for t in kept if (v := tag_version(t)) is not None
                        and (self.semver is not None or not v.prerelease)}
            top = set(sorted(set(versions.values()), reverse=True)[: self.latest])
            kept = [t for t in kept if versions.get(t) in top]
        return sorted(kept, key=_order)

    def describe(self) -> str:
        """The selector as list-file options (quoted where a value holds spaces)."""
        parts = [f"--tags={_quote(p)}" for p in self.tags]
        if self.semver is not None:
            parts.append(f"--semver={_quote(self.semver)}")
        if self.all_tags:
            parts.append("--all-tags")
        parts += [f"--exclude-tags={_quote(p)}" for p in self.exclude]
        if self.latest is not None:
            parts.append(f"--latest={self.latest}")
        return " ".join(parts)


def _order(tag: str) -> tuple[int, tuple[int, ...], str]:
    v = tag_version(tag)
    if v is None:
        return (1, (), tag)
    # Highest first; a release above its own pre-releases.
    return (0, (-v.major, -v.minor, -v.patch, 0 if not v.prerelease else 1), tag)


def _quote(value: str) -> str:
    return f'"{value}"' if any(c.isspace() for c in value) else value
