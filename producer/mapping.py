"""Where each listed image goes: explicit destinations, or the source path under each target."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from config.reference import (
    InvalidReference,
    Reference,
    normalize_registry,
    registry_problem,
    repository_problem,
)
from producer.listfile import LineError, ListEntry, ListFileError

_NO_DESTINATION = "no destination: give --target or a destination on the line"


@dataclass(frozen=True)
class Target:
    """A registry and an optional namespace that mirrored images are placed under."""

    registry: str
    namespace: str = ""

    def __post_init__(self) -> None:
        reason = registry_problem(self.registry)
        if reason is None and self.namespace:
            reason = repository_problem(self.namespace)
        if reason is not None:
            raise InvalidReference(str(self), f"bad target: {reason}")

    @classmethod
    def parse(cls, text: str) -> Target:
        """``registry.example.com/mirror``, ``127.0.0.1:5002`` or ``host:port/a/b``."""
        if not text.strip():
            raise InvalidReference(text, "the target is empty; give host[:port][/namespace]")
        if "://" in text:
            raise InvalidReference(text, "give the target as host[:port][/namespace], without a URL scheme")
        if "@" in text:
            raise InvalidReference(text, "a target is a registry and namespace, not an image: drop '@digest'")
        registry, _, namespace = text.strip().rstrip("/").partition("/")
        if ":" in namespace:
            raise InvalidReference(text, "a target is a registry and namespace, not an image: drop ':tag'")
        return cls(normalize_registry(registry), namespace)

    def __str__(self) -> str:
        return f"{self.registry}/{self.namespace}" if self.namespace else self.registry


@dataclass(frozen=True)
class Mapped:
    entry: ListEntry
    destinations: tuple[Reference, ...]


def map_destinations(entries: Iterable[ListEntry], targets: Sequence[Target], *, flatten: bool) -> list[Mapped]:
    """Give every entry its destinations; raise ListFileError listing every problem.

    A destination written on the line is used alone. Otherwise each target gets
    one: the source path under the target's namespace, or with ``flatten`` only
    its last element. Tag and digest carry over unchanged. A selector line's
    destinations are repositories, each filled from one source repository.
    """
    mapped: list[Mapped] = []
    errors: list[LineError] = []
    # Destination key -> the entry that claimed it first.
    claimed: dict[tuple[str, str], ListEntry] = {}
    for entry in entries:
        if entry.destination is not None:
            destinations: tuple[Reference, ...] = (entry.destination,)
        elif not targets:
            errors.append(LineError(entry.line, entry.text, _NO_DESTINATION))
            continue
        else:
            try:
                destinations = tuple(_under_target(entry.source, t, flatten) for t in targets)
            except InvalidReference as exc:
                errors.append(LineError(entry.line, entry.text, f"cannot build destination: {exc.reason}"))
                continue
        clashed = False
        for destination in destinations if entry.selector is None else ():
            key = (destination.name, destination.ref if destination.tag is None else destination.tag)
            other = claimed.setdefault(key, entry)
            if other is not entry and not _same_image(other, entry):
                errors.append(LineError(entry.line, entry.text, _clash(destination, other, entry, flatten)))
                clashed = True
        if not clashed:
            mapped.append(Mapped(entry, destinations))
    errors += _repository_clashes(mapped, flatten)
    if errors:
        raise ListFileError(sorted(errors, key=lambda e: e.line))
    return mapped


def _repository_clashes(mapped: Sequence[Mapped], flatten: bool) -> list[LineError]:
    """A repository a selector line fills takes tags from that line's source repository only."""
    filled: dict[str, ListEntry] = {}
    for m in mapped:
        if m.entry.selector is not None:
            for d in m.destinations:
                filled.setdefault(d.name, m.entry)
    errors: list[LineError] = []
    for m in mapped:
        for d in m.destinations:
            owner = filled.get(d.name)
            if owner is not None and owner is not m.entry and owner.source.name != m.entry.source.name:
                why = ("flattening to the last path element collided; give one of them an explicit destination"
                       if flatten else "its tags would come from two repositories")
                errors.append(LineError(m.entry.line, m.entry.text,
                                        f"destination repository {d.name} is filled by the selector on line "
                                        f"{owner.line} from {owner.source.name} ({why})"))
                break
    return errors


def _under_target(source: Reference, target: Target, flatten: bool) -> Reference:
    path = source.repository.rsplit("/", 1)[-1] if flatten else source.repository
    repository = f"{target.namespace}/{path}" if target.namespace else path
    return source.with_name(target.registry, repository)


def _same_image(a: ListEntry, b: ListEntry) -> bool:
    # Writing the same copy twice is harmless; two different images on one name is not.
    return a.source == b.source and frozenset(a.platforms) == frozenset(b.platforms)


def _clash(destination: Reference, first: ListEntry, later: ListEntry, flatten: bool) -> str:
    why = (
        "flattening to the last path element collided; give one of them an explicit destination"
        if flatten and first.destination is None and later.destination is None
        else "each destination can hold only one image"
    )
    return f"destination {destination} is also the destination of line {first.line} ({why})"
