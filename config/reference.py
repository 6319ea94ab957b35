"""Image references and registry names, parsed and normalised the way docker does it.

The grammar follows distribution/reference (the one ``docker pull`` uses):

    reference := name [ ":" tag ] [ "@" digest ]
    name      := [ domain "/" ] path-component { "/" path-component }

The first path element is a domain only when it holds a ``.`` or ``:``, is
``localhost``, or has an uppercase letter; otherwise the image is on Docker
Hub, where single-element names live under ``library/``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
# Other spellings of Docker Hub, folded into DOCKER_HUB.
HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
# Lookups also fold the Hub's web host, which docker files credentials under; a reference
# naming it keeps it, as before.
_HUB_NAMES = HUB_ALIASES | {"registry.hub.docker.com"}
OFFICIAL_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_MAX = 255
TAG_MAX = 128

# Digest algorithms go-digest accepts, with the hex length of each.
_DIGEST_HEX_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}

# \Z rather than $ so a trailing newline never passes (digests become file names).
DIGEST_RE = re.compile(r"^(?:sha256:[a-f0-9]{64}|sha384:[a-f0-9]{96}|sha512:[a-f0-9]{128})\Z")

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?")
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_COMPONENT_RE = re.compile(_PATH_COMPONENT)
_REPOSITORY_RE = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
# A strict subset of the grammar: lowercase dotted hosts or localhost, sha256 digests.
_FAST_HOST = r"(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?::[0-9]+)?|localhost(?::[0-9]+)?"
_FAST_RE = re.compile(
    rf"(?:(?P<host>{_FAST_HOST})/)?(?P<path>{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[a-f0-9]{64}))?"
)
# Go's \w is ASCII-only; spell it out so Python's Unicode \w does not widen it.
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST_SHAPE_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")
_IMAGE_ID_RE = re.compile(r"[a-f0-9]{64}")
_SPACE_RE = re.compile(r"\s")
# No valid reference is longer: a 255-character name, a tag and a sha512 digest.
_INPUT_MAX = NAME_MAX + 1 + TAG_MAX + 1 + len("sha512:") + 128


class InvalidInput(ValueError):
    """Text that cannot be used as what ``what`` names, with the reason in words."""

    what = "input"

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason
        super().__init__(f"invalid {self.what} {_shorten(text)!r}: {reason}")

    def __reduce__(self) -> tuple[type[InvalidInput], tuple[str, str]]:
        # Rebuilt from both fields when pickled across processes.
        return (type(self), (self.text, self.reason))


class InvalidReference(InvalidInput):
    """An image reference that cannot be used, with the reason in words."""

    what = "image reference"


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_digest(s: str) -> bool:
    """True for a well-formed ``sha256:<64 hex>`` (or sha384/sha512) digest."""
    return DIGEST_RE.match(s) is not None


def normalize_registry(registry: str) -> str:
    """A reference's registry as written, but Docker Hub's API hosts become ``docker.io``."""
    return DOCKER_HUB if registry.lower() in HUB_ALIASES else registry


def canonical_registry(name: str) -> str:
    """The one name registries are compared and looked up by: ``host[:port]`` in lower case,
    with every name of Docker Hub folded into ``docker.io``.

    Accepts URLs as found in docker's config (``https://index.docker.io/v1/``).
    """
    s = name.strip()
    if "://" in s:
        s = urlsplit(s).netloc or s
    s = s.split("/", 1)[0].lower()
    return DOCKER_HUB if s in _HUB_NAMES else s


def host_is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ``::1``, as ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``.

    These are the hosts docker treats as insecure by default. ``*.localhost`` is not among
    them: nothing here resolves names, and only ``localhost`` itself is pinned to loopback
    by /etc/hosts; a subdomain goes to whatever resolver is configured, which RFC 6761 asks
    but does not force to answer with loopback. List such hosts as insecure registries.
    """
    h = host.strip()
    if h.startswith("["):
        h = h[1 : h.find("]")] if "]" in h else h[1:]
    elif h.count(":") == 1:
        h = h.split(":", 1)[0]
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


@lru_cache(maxsize=1024)
def registry_problem(registry: str) -> str | None:
    """Why ``registry`` is not a usable ``host[:port]``, or None when it is."""
    # Cached: a list names the same few registries on thousands of lines.
    if not registry:
        return "the registry host is empty"
    if not _DOMAIN_RE.fullmatch(registry):
        return f"{registry!r} is not a valid registry host[:port]"
    if registry != normalize_registry(registry):
        return f"write Docker Hub as {DOCKER_HUB!r}, not {registry!r}"
    return None


def repository_problem(repository: str) -> str | None:
    """Why ``repository`` is not a valid repository path, or None when it is."""
    if _REPOSITORY_RE.fullmatch(repository):
        return None
    if not repository:
        return "the repository name is empty"
    if repository.lower() != repository:
        return f"repository name {repository!r} must be lowercase"
    for component in repository.split("/"):
        if not component:
            return f"repository name {repository!r} has an empty path component"
        if not _PATH_COMPONENT_RE.fullmatch(component):
            return (
                f"path component {component!r} is not valid: use lowercase letters and digits, "
                "separated by '.', '_', '__' or dashes, neither first nor last"
            )
    return None


def tag_problem(tag: str) -> str | None:
    if len(tag) > TAG_MAX:
        return f"tag is {len(tag)} characters long; at most {TAG_MAX} are allowed"
    if not _TAG_RE.fullmatch(tag):
        return f"tag {tag!r} is not valid: use letters, digits, '_', '.' and '-', not starting with '.' or '-'"
    return None


def digest_problem(digest: str) -> str | None:
    if not _DIGEST_SHAPE_RE.fullmatch(digest):
        return f"digest {digest!r} is not of the form 'sha256:<64 hex characters>'"
    algorithm, _, encoded = digest.partition(":")
    expected = _DIGEST_HEX_LENGTHS.get(algorithm)
    if expected is None:
        return f"digest algorithm {algorithm!r} is not supported (use sha256, sha384 or sha512)"
    if len(encoded) != expected:
        return f"{algorithm} digest must have {expected} hex characters, not {len(encoded)}"
    if encoded.lower() != encoded:
        return f"{algorithm} digest must be lowercase hex"
    return None


@dataclass(frozen=True, slots=True)
class Reference:
    """A fully qualified image reference, e.g. ``docker.io/library/nginx:latest``.

    Every instance is valid: the fields are checked on construction, so one
    built directly or through ``with_*`` obeys the same rules as ``parse``.
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __post_init__(self) -> None:
        reason = (
            registry_problem(self.registry)
            or repository_problem(self.repository)
            or (tag_problem(self.tag) if self.tag is not None else None)
            or (digest_problem(self.digest) if self.digest is not None else None)
        )
        if reason is None and self.tag is None and self.digest is None:
            reason = "a reference needs a tag or a digest"
        if reason is None and len(self.registry) + 1 + len(self.repository) > NAME_MAX:
            reason = f"name is {len(self.name)} characters long; at most {NAME_MAX} are allowed"
        if reason is not None:
            raise InvalidReference(self._text(), reason)

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse what a person would give ``docker pull``; a bare name gets the tag ``latest``."""
        # Lists hold up to 100k lines: common shapes take one regex match, the rest the full path.
        if len(text) <= _INPUT_MAX:
            match = _FAST_RE.fullmatch(text)
            if match is not None:
                fast = cls._from_fast_match(text, match)
                if fast is not None:
                    return fast
        return cls._parse_full(text)

    @classmethod
    def _from_fast_match(cls, text: str, match: re.Match[str]) -> Reference | None:
        host, repository, tag, digest = match.group("host", "path", "tag", "digest")
        if host is None:
            first, slash, _ = repository.partition("/")
            if slash and "." in first:
                return None  # docker reads a dotted first element as a host: leave it to the full path
            registry = DOCKER_HUB
        else:
            registry = normalize_registry(host)
        if registry == DOCKER_HUB and "/" not in repository:
            repository = OFFICIAL_PREFIX + repository
        if len(registry) + 1 + len(repository) > NAME_MAX or _IMAGE_ID_RE.fullmatch(text):
            return None
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        # Every part matched a pattern no looser than the full checks, so skip re-validating.
        ref = object.__new__(cls)
        object.__setattr__(ref, "registry", registry)
        object.__setattr__(ref, "repository", repository)
        object.__setattr__(ref, "tag", tag)
        object.__setattr__(ref, "digest", digest)
        return ref

    @classmethod
    def _parse_full(cls, text: str) -> Reference:
        reason = _parse_problem(text)
        if reason is not None:
            raise InvalidReference(text, reason)
        rest, _, digest = text.partition("@")
        tag: str | None = None
        colon = rest.rfind(":")
        if colon > rest.rfind("/"):
            rest, tag = rest[:colon], rest[colon + 1 :]
        registry, repository = _split_domain(rest)
        if tag is None and not digest:
            tag = DEFAULT_TAG
        try:
            return cls(registry, repository, tag, digest or None)
        except InvalidReference as exc:
            raise InvalidReference(text, exc.reason) from None

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def ref(self) -> str:
        """What goes in ``/v2/<repository>/manifests/<ref>``: the digest if pinned, else the tag."""
        ref = self.digest or self.tag
        assert ref is not None  # guaranteed by __post_init__
        return ref

    @property
    def familiar(self) -> str:
        """Docker's short form: ``nginx:latest``, ``bitnami/redis:7``, ``quay.io/x/y:v1``."""
        if self.registry == DOCKER_HUB:
            name = self.repository
            if name.startswith(OFFICIAL_PREFIX) and "/" not in name[len(OFFICIAL_PREFIX) :]:
                name = name[len(OFFICIAL_PREFIX) :]
        else:
            name = self.name
        return name + self._suffix()

    @property
    def api_host(self) -> str:
        """The host to send registry API calls to."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def is_loopback(self) -> bool:
        return host_is_loopback(self.registry)

    def with_tag(self, tag: str | None) -> Reference:
        return self._with(tag, self.digest)

    def with_digest(self, digest: str | None) -> Reference:
        return self._with(self.tag, digest)

    def _with(self, tag: str | None, digest: str | None) -> Reference:
        """This name with another tag or digest, checking only what changed (a copy asks for
        several per image: the name was checked when this reference was made)."""
        if tag == self.tag and digest == self.digest:
            return self
        reason = (
            (tag_problem(tag) if tag is not None and tag != self.tag else None)
            or (digest_problem(digest) if digest is not None and digest != self.digest else None)
        )
        if reason is None and tag is None and digest is None:
            reason = "a reference needs a tag or a digest"
        text = self.name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
        if reason is not None:
            raise InvalidReference(text, reason)
        ref = object.__new__(type(self))
        object.__setattr__(ref, "registry", self.registry)
        object.__setattr__(ref, "repository", self.repository)
        object.__setattr__(ref, "tag", tag)
        object.__setattr__(ref, "digest", digest)
        return ref

    def with_name(self, registry: str, repository: str) -> Reference:
        """Same tag and digest under another name; Docker Hub names are normalised."""
        registry = normalize_registry(registry)
        if registry == DOCKER_HUB and "/" not in repository:
            repository = OFFICIAL_PREFIX + repository
        return dataclasses.replace(self, registry=registry, repository=repository)

    def _suffix(self) -> str:
        return (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")

    def _text(self) -> str:
        return self.name + self._suffix()

    def __str__(self) -> str:
        return self._text()


def name_of(text: str) -> str:
    """``registry/repository`` of an image reference, or ``text`` itself when it is none."""
    try:
        return Reference.parse(text).name
    except ValueError:
        return text


def _parse_problem(text: str) -> str | None:
    """Cheap checks before splitting, so odd input gets a precise reason."""
    if not text:
        return "the reference is empty"
    if len(text) > _INPUT_MAX:
        return f"the reference is {len(text)} characters long; no valid one exceeds {_INPUT_MAX}"
    if _SPACE_RE.search(text):
        return "the reference contains whitespace"
    if "://" in text:
        return "drop the URL scheme: a reference is 'host/path:tag', not a URL"
    if text.count("@") > 1:
        return "the reference has more than one '@'"
    if text.startswith(("/", ":", "@")):
        return "the reference must start with a name"
    if text.startswith("[") and "/" not in text.partition("@")[0]:
        return "a bracketed IPv6 registry host must be followed by '/repository'"
    if _IMAGE_ID_RE.fullmatch(text):
        return "a 64-character hex string is an image ID, not a repository name"
    return None


def _split_domain(name: str) -> tuple[str, str]:
    """Split ``name`` (no tag or digest) into registry and repository, docker-style."""
    first, slash, remainder = name.partition("/")
    if slash and (first == "localhost" or "." in first or ":" in first or first.lower() != first):
        registry, repository = normalize_registry(first), remainder
    else:
        registry, repository = DOCKER_HUB, name
    if registry == DOCKER_HUB and "/" not in repository:
        repository = OFFICIAL_PREFIX + repository
    return registry, repository
