"""The image list: one image per line, parsed into entries or a complete list of mistakes.

    # comments and blank lines are ignored
    nginx                                         # docker.io/library/nginx:latest
    --platform=linux/amd64,linux/arm64 redis:7    # only these platforms
    --no-referrers ghcr.io/org/app:v1             # without its signatures, attestations and SBOMs
    quay.io/org/app:v1  mirror.example.com/infra/app:v1   # explicit destination
    --semver=">=7" --latest=3 redis               # tags chosen on the workers (config.selectors)

A destination written without a tag or digest takes the source's. A line with a selector names
repositories: each tag it selects keeps its name at the destination.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from config.platform import Platform, PlatformError
from config.reference import InvalidReference, Reference
from config.selectors import SelectorError, TagSelector

DISPLAY_LIMIT = 80


def _shorten(text: str) -> str:
    return text if len(text) <= DISPLAY_LIMIT else text[: DISPLAY_LIMIT - 3] + "..."


@dataclass(frozen=True, slots=True)
class ListEntry:
    """One image line: where it comes from, optionally where it goes, which platforms."""

    line: int
    text: str
    source: Reference
    destination: Reference | None = None
    # Empty means every platform the source has.
    platforms: tuple[Platform, ...] = ()
    # Whether the image's signatures, attestations and SBOMs go along.
    referrers: bool = True
    # Set on a line that selects tags: source and destination then name repositories.
    selector: TagSelector | None = None


@dataclass(frozen=True, slots=True)
class LineError:
    line: int
    text: str
    reason: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", _shorten(self.text))

    def __str__(self) -> str:
        where = f"LINE {self.line}: {self.reason}"
        return f"{where}: {self.text}" if self.text else where


class ListFileError(Exception):
    """Every problem found in a list, so all of them can be fixed in one go."""

    def __init__(self, errors: Iterable[LineError]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))

    def __reduce__(self) -> tuple[type[ListFileError], tuple[list[LineError]]]:
        return (type(self), (self.errors,))


@dataclass
class ParsedList:
    entries: list[ListEntry] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class _LineProblem(Exception):
    pass


_Key = tuple[str, str, str | None, str | None, str | None, frozenset[Platform] | None, TagSelector | None]


def _key(entry: ListEntry) -> _Key:
    # Plain strings hash in C; hashing the dataclasses costs a Python call per line.
    src, dst = entry.source, entry.destination
    platforms = frozenset(entry.platforms) if entry.platforms else None
    return (src.registry, src.repository, src.tag, src.digest, str(dst) if dst else None, platforms, entry.selector)


def parse_list(data: bytes, *, max_lines: int = 100_000, max_line_length: int = 4096) -> ParsedList:
    """Parse list-file bytes; raise ListFileError naming every bad line."""
    result = ParsedList()
    errors: list[LineError] = []
    # Key -> line number of the first entry with that source, destination and platforms.
    seen: dict[_Key, int] = {}
    images = 0
    for number, text, content in _lines(data, max_line_length, errors):
        images += 1
        if images > max_lines:
            errors.append(LineError(number, text, f"more than {max_lines} images in one list; split the list"))
            break
        try:
            entry = _parse_line(number, text, content)
        except _LineProblem as exc:
            errors.append(LineError(number, text, str(exc)))
            continue
        first = seen.setdefault(_key(entry), number)
        if first != number:
            result.warnings.append(f"line {number} repeats line {first} ({_shorten(text)}); ignored")
            continue
        result.entries.append(entry)
    if not result.entries and not errors:
        errors.append(LineError(0, "", "no images in list"))
    if errors:
        raise ListFileError(errors)
    return result


def _lines(data: bytes, max_line_length: int, errors: list[LineError]) -> Iterator[tuple[int, str, str]]:
    """Yield (line number, stripped line, its content before any comment) for each image line."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if len(raw) > max_line_length:
            shown = raw[:DISPLAY_LIMIT].decode("utf-8", "replace")
            errors.append(LineError(number, shown, f"line is {len(raw)} bytes long; at most {max_line_length} allowed"))
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            shown = raw.decode("utf-8", "replace")
            errors.append(LineError(number, shown, f"not valid UTF-8 (byte {exc.start + 1} of the line)"))
            continue
        content = _strip_comment(line).strip()
        if content:
            yield number, line.strip(), content


def _strip_comment(line: str) -> str:
    # '#' starts a comment at the line start or after whitespace; elsewhere it is part of a word.
    at = line.find("#")
    while at > 0 and not line[at - 1].isspace():
        at = line.find("#", at + 1)
    return line if at < 0 else line[:at]


def _parse_line(number: int, text: str, content: str) -> ListEntry:
    words = _words(content) if '"' in content or "'" in content else content.split()
    platforms: list[Platform] = []
    flags: set[str] = set()
    chosen: dict[str, list[str]] = {}
    positional = _options(words, platforms, flags, chosen) if "--" in content else words
    if not positional:
        raise _LineProblem("missing image after options")
    if len(positional) > 2:
        raise _LineProblem("more than two fields: expected [--platform=...] SOURCE [DESTINATION]")
    selector = _selector(chosen, positional) if chosen else None
    source = _reference(positional[0], "source")
    destination = None
    if len(positional) == 2:
        destination = _reference(positional[1], "destination")
        if selector is not None or not _names_tag_or_digest(positional[1]):
            destination = source.with_name(destination.registry, destination.repository)
        elif destination.digest and source.digest and destination.digest != source.digest:
            raise _LineProblem("the destination digest differs from the source digest")
    return ListEntry(number, text, source, destination, tuple(dict.fromkeys(platforms)) if platforms else (),
                     referrers="--no-referrers" not in flags, selector=selector)


# Options that take no value.
_FLAGS = frozenset({"--no-referrers", "--all-tags"})
# Options that choose tags (see config.selectors).
SELECTOR_OPTIONS = ("--tags", "--semver", "--latest", "--all-tags", "--exclude-tags")
_EXAMPLES = {"--platform": "linux/amd64", "--tags": "'^v1\\.30\\.[0-9]+$'", "--semver": "'>=1.28 <1.31'",
             "--latest": "3", "--exclude-tags": "-rc"}


def _options(words: list[str], platforms: list[Platform], flags: set[str], chosen: dict[str, list[str]]) -> list[str]:
    """Collect --platform values into ``platforms``, value-less options into ``flags`` and selector
    options into ``chosen`` (--all-tags in both);
    return the other words."""
    positional: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if not word.startswith("--"):
            positional.append(word)
            continue
        option, eq, value = word.partition("=")
        if option in _FLAGS:
            if eq:
                raise _LineProblem(f"{option} takes no value")
            flags.add(option)
            if option == "--all-tags":
                chosen.setdefault(option, []).append("")
            continue
        if option != "--platform" and option not in SELECTOR_OPTIONS:
            known = ", ".join(("--platform", "--no-referrers", *SELECTOR_OPTIONS))
            raise _LineProblem(f"unknown option {_shorten(option)!r} (understood: {known})")
        if not eq:
            if i >= len(words) or words[i].startswith("--"):
                raise _LineProblem(f"{option} needs a value, e.g. {option}={_EXAMPLES[option]}")
            value = words[i]
            i += 1
        if option == "--platform":
            platforms.extend(_parse_platforms(value))
        elif not value:
            raise _LineProblem(f"empty {option} value, e.g. {option}={_EXAMPLES[option]}")
        else:
            chosen.setdefault(option, []).append(value)
    return positional


def _selector(chosen: dict[str, list[str]], positional: list[str]) -> TagSelector:
    """The line's tag selector; its source and destination must name repositories."""
    for option in ("--semver", "--latest", "--all-tags"):
        if len(chosen.get(option, ())) > 1:
            raise _LineProblem(f"{option} given twice" + (" (join ranges with ||)" if option == "--semver" else ""))
    for word, role in zip(positional, ("source", "destination"), strict=False):
        if "@" in word:
            raise _LineProblem(f"a selector picks tags of a repository, but the {role} is pinned to a digest: "
                               "drop '@sha256:...' or the selector")
        if _names_tag_or_digest(word):
            raise _LineProblem(f"a line with a selector names repositories: drop ':tag' from the {role}")
    latest = chosen.get("--latest", [None])[0]
    if latest is not None and not latest.isdigit():
        raise _LineProblem(f"--latest={_shorten(latest)!r}: give a whole number of versions, e.g. --latest=3")
    try:
        return TagSelector.of(tags=chosen.get("--tags", ()), semver=chosen.get("--semver", [None])[0],
                              latest=int(latest) if latest is not None else None,
                              all_tags="--all-tags" in chosen, exclude=chosen.get("--exclude-tags", ()))
    except SelectorError as exc:
        raise _LineProblem(exc.reason) from None


def _words(content: str) -> list[str]:
    """Split on whitespace outside quotes; quotes group (``--semver=">=1.28 <1.31"``) and are
    dropped. Backslashes stay as written: they belong to regexes."""
    words: list[str] = []
    current: list[str] = []
    quote = ""
    started = False
    for ch in content:
        if quote:
            if ch == quote:
                quote = ""
            else:
                current.append(ch)
        elif ch in "\"'":
            quote, started = ch, True
        elif ch.isspace():
            if started:
                words.append("".join(current))
                current, started = [], False
        else:
            current.append(ch)
            started = True
    if quote:
        raise _LineProblem(f"unterminated {quote} quote")
    if started:
        words.append("".join(current))
    return words


def _reference(word: str, role: str) -> Reference:
    try:
        return Reference.parse(word)
    except InvalidReference as exc:
        raise _LineProblem(f"bad {role} reference: {exc.reason}") from None


def _parse_platforms(value: str) -> list[Platform]:
    if not value:
        raise _LineProblem("empty --platform value")
    platforms = []
    for item in value.split(","):
        if not item:
            raise _LineProblem(f"empty platform in --platform={_shorten(value)}")
        try:
            platforms.append(Platform.parse(item))
        except PlatformError as exc:
            raise _LineProblem(f"bad platform {_shorten(item)!r}: {exc.reason}") from None
    return platforms


def _names_tag_or_digest(word: str) -> bool:
    """Whether a reference as written carries its own tag or digest."""
    return "@" in word or word.rfind(":") > word.rfind("/")
