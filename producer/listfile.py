"""The image list: one image per line, parsed into entries or a complete list of mistakes.

    # comments and blank lines are ignored
    nginx                                         # docker.io/library/nginx:latest
    --platform=linux/amd64,linux/arm64 redis:7    # only these platforms
    --no-referrers ghcr.io/org/app:v1             # without its signatures, attestations and SBOMs
    quay.io/org/app:v1  mirror.example.com/infra/app:v1   # explicit destination

A destination written without a tag or digest takes the source's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from config.platform import Platform, PlatformError
from config.reference import InvalidReference, Reference

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


_Key = tuple[str, str, str | None, str | None, str | None, frozenset[Platform] | None]


def _key(entry: ListEntry) -> _Key:
    # Plain strings hash in C; hashing the dataclasses costs a Python call per line.
    src, dst = entry.source, entry.destination
    platforms = frozenset(entry.platforms) if entry.platforms else None
    return (src.registry, src.repository, src.tag, src.digest, str(dst) if dst else None, platforms)


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
    words = content.split()
    platforms: list[Platform] = []
    flags: set[str] = set()
    positional = _options(words, platforms, flags) if "--" in content else words
    if not positional:
        raise _LineProblem("missing image after options")
    if len(positional) > 2:
        raise _LineProblem("more than two fields: expected [--platform=...] SOURCE [DESTINATION]")
    source = _reference(positional[0], "source")
    destination = None
    if len(positional) == 2:
        destination = _reference(positional[1], "destination")
        if not _names_tag_or_digest(positional[1]):
            destination = source.with_name(destination.registry, destination.repository)
        elif destination.digest and source.digest and destination.digest != source.digest:
            raise _LineProblem("the destination digest differs from the source digest")
    return ListEntry(number, text, source, destination, tuple(dict.fromkeys(platforms)) if platforms else (),
                     referrers="--no-referrers" not in flags)


# Options that take no value.
_FLAGS = frozenset({"--no-referrers"})


def _options(words: list[str], platforms: list[Platform], flags: set[str]) -> list[str]:
    """Collect --platform values into ``platforms`` and value-less options into ``flags``;
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
            continue
        if option != "--platform":
            raise _LineProblem(f"unknown option {_shorten(option)!r} (understood: --platform, --no-referrers)")
        if not eq:
            if i >= len(words):
                raise _LineProblem("--platform needs a value, e.g. --platform=linux/amd64")
            value = words[i]
            i += 1
        platforms.extend(_parse_platforms(value))
    return positional


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
