"""Platforms (``os/architecture[/variant]``), parsed and matched as docker and containerd do."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from config.reference import InvalidInput


class PlatformError(InvalidInput):
    """A platform string that is not ``os/architecture[/variant]``."""

    what = "platform"


# Architecture spellings that mean the same thing, and the variant they imply.
_ARCH_ALIASES: dict[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None),
    "x86-64": ("amd64", None),
    "aarch64": ("arm64", None),
    "armhf": ("arm", "v7"),
    "armel": ("arm", "v6"),
    "i386": ("386", None),
}
# The variant an image means when it names none (containerd's defaults).
_DEFAULT_VARIANTS = {"arm64": "v8", "arm": "v7", "amd64": "v1"}
_PLATFORM_TOKEN_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")


def _normalize_arch(architecture: str, variant: str | None) -> tuple[str, str | None]:
    architecture, implied = _ARCH_ALIASES.get(architecture, (architecture, None))
    if variant is None:
        variant = implied
    elif variant.isdigit():
        variant = "v" + variant
    elif variant.endswith(".0") and variant[:-2].lstrip("v").isdigit():
        variant = variant[:-2]
    return architecture, variant


@dataclass(frozen=True, slots=True)
class Platform:
    """``os/architecture[/variant]`` as in ``--platform linux/arm64/v8``."""

    os: str
    architecture: str
    variant: str | None = None

    def __post_init__(self) -> None:
        fields = {"os": self.os, "architecture": self.architecture, "variant": self.variant}
        for label, value in fields.items():
            if value is None and label == "variant":
                continue
            if not isinstance(value, str) or not _PLATFORM_TOKEN_RE.fullmatch(value):
                raise PlatformError(self._text(), f"{label} {value!r} must be a lowercase word like 'linux' or 'arm64'")
        # Fold aliases (aarch64, x86_64, "8") so equal platforms compare equal.
        architecture, variant = _normalize_arch(self.architecture, self.variant)
        object.__setattr__(self, "architecture", architecture)
        object.__setattr__(self, "variant", variant)

    @classmethod
    def parse(cls, text: str) -> Platform:
        # Lists repeat the same few platforms on thousands of lines.
        return _parse_platform(text)

    @classmethod
    def _parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if not text.strip():
            raise PlatformError(text, "the platform is empty")
        if len(parts) < 2:
            raise PlatformError(text, "expected os/architecture[/variant], e.g. linux/amd64")
        if len(parts) > 3:
            raise PlatformError(text, "too many '/': expected os/architecture[/variant]")
        for part in parts:
            if not _PLATFORM_TOKEN_RE.fullmatch(part):
                raise PlatformError(text, f"{part!r} is not a lowercase word like 'linux', 'arm64' or 'v8'")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def matches(self, descriptor_platform: Mapping[str, object]) -> bool:
        """Whether an index entry's ``platform`` object is one this filter selects.

        A filter without a variant takes every variant of its architecture;
        an entry without a variant has its architecture's default one.
        """
        os_ = descriptor_platform.get("os")
        arch = descriptor_platform.get("architecture")
        variant = descriptor_platform.get("variant") or None
        if not isinstance(os_, str) or not isinstance(arch, str):
            return False
        if variant is not None and not isinstance(variant, str):
            return False
        arch, variant = _normalize_arch(arch.lower(), variant.lower() if variant else None)
        if os_.lower() != self.os or arch != self.architecture:
            return False
        if self.variant is None:
            return True
        return self.variant == (variant or _DEFAULT_VARIANTS.get(arch))

    def _text(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base

    def __str__(self) -> str:
        return self._text()


@lru_cache(maxsize=256)
def _parse_platform(text: str) -> Platform:
    return Platform._parse(text)
