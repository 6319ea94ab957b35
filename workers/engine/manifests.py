"""Manifests and indexes: media types, fetching with limits, parsing descriptors, pushing.

Manifests are always pushed as the exact bytes fetched, so digests survive the copy.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from config.reference import Reference, is_digest
from workers.engine.errors import ManifestError, NotFound, RegistryError, missing
from workers.engine.transport import RegistryTransport

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
IMAGE_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
MANIFEST_TYPES = INDEX_TYPES | IMAGE_TYPES
SCHEMA1_TYPES = frozenset({DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED})
ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])

SCHEMA1_REFUSED = ("docker schema 1 manifests are not supported; push the image again with a "
                   "current docker or buildx to get a schema 2 or OCI manifest")
# distribution refuses larger manifests; anything bigger is not an image.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    if algorithm not in ("sha256", "sha384", "sha512"):
        raise ManifestError(f"unsupported digest algorithm {algorithm!r}")
    return f"{algorithm}:" + hashlib.new(algorithm, data).hexdigest()


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Mapping[str, Any] | None = None
    urls: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, doc: object, where: str) -> Descriptor:
        if not isinstance(doc, dict):
            raise ManifestError(f"{where} is not a descriptor object")
        digest, size, media_type = doc.get("digest"), doc.get("size"), doc.get("mediaType", "")
        if not isinstance(digest, str) or not is_digest(digest):
            raise ManifestError(f"{where} has no valid digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"{where} has no valid size")
        platform = doc.get("platform")
        urls = doc.get("urls")
        return cls(
            media_type=media_type if isinstance(media_type, str) else "",
            digest=digest,
            size=size,
            platform=platform if isinstance(platform, dict) else None,
            urls=tuple(u for u in urls if isinstance(u, str)) if isinstance(urls, list) else (),
        )

    @property
    def foreign(self) -> bool:
        """Layers kept outside registries (Windows base layers); never copied."""
        return bool(self.urls) and ("foreign" in self.media_type or "nondistributable" in self.media_type)


@dataclass(frozen=True)
class Manifest:
    """A fetched manifest or index: its exact bytes and the descriptors inside."""

    media_type: str
    digest: str
    raw: bytes
    config: Descriptor | None = None
    layers: tuple[Descriptor, ...] = ()
    children: tuple[Descriptor, ...] = ()
    subject: Descriptor | None = None
    doc: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    def blobs(self) -> list[Descriptor]:
        """The blobs this manifest needs at the destination (config first, then layers)."""
        found = ([self.config] if self.config else []) + list(self.layers)
        return [d for d in found if not d.foreign]


@dataclass(frozen=True)
class ManifestHead:
    digest: str
    media_type: str
    size: int | None
    # Set when the registry sent no digest header and the manifest had to be fetched.
    manifest: Manifest | None = None


def parse_manifest(raw: bytes, *, content_type: str | None, digest: str | None = None) -> Manifest:
    """Parse and classify ``raw``; schema 1 and malformed documents raise ManifestError."""
    ctype = (content_type or "").split(";", 1)[0].strip()
    if ctype in SCHEMA1_TYPES:
        raise ManifestError(SCHEMA1_REFUSED)
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"manifest is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ManifestError("manifest is not a JSON object")
    if doc.get("schemaVersion") == 1:
        raise ManifestError(SCHEMA1_REFUSED)
    if doc.get("schemaVersion") != 2:
        raise ManifestError(f"unsupported manifest schemaVersion {doc.get('schemaVersion')!r}")
    media_type = doc.get("mediaType") if isinstance(doc.get("mediaType"), str) else None
    if media_type is None:
        # OCI lets mediaType be omitted; the header or the shape decides.
        if ctype in MANIFEST_TYPES:
            media_type = ctype
        elif "manifests" in doc:
            media_type = OCI_INDEX
        elif "config" in doc:
            media_type = OCI_MANIFEST
        else:
            raise ManifestError("manifest has no mediaType and is neither an index nor an image")
    if media_type not in MANIFEST_TYPES:
        raise ManifestError(f"unsupported manifest media type {media_type!r}")
    digest = digest or sha256_digest(raw)
    subject_doc = doc.get("subject")
    subject = Descriptor.from_json(subject_doc, "subject") if isinstance(subject_doc, dict) else None
    if media_type in INDEX_TYPES:
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise ManifestError("index has no 'manifests' list")
        children = tuple(Descriptor.from_json(e, f"manifests[{i}]") for i, e in enumerate(entries))
        return Manifest(media_type, digest, raw, children=children, subject=subject, doc=doc)
    if "config" not in doc:
        raise ManifestError("image manifest has no config descriptor")
    config = Descriptor.from_json(doc["config"], "config")
    layers_doc = doc.get("layers", [])
    if not isinstance(layers_doc, list):
        raise ManifestError("image manifest 'layers' is not a list")
    layers = tuple(Descriptor.from_json(e, f"layers[{i}]") for i, e in enumerate(layers_doc))
    return Manifest(media_type, digest, raw, config=config, layers=layers, subject=subject, doc=doc)


def _path(ref: Reference, ref_str: str | None = None) -> str:
    return f"/v2/{ref.repository}/manifests/{ref_str or ref.ref}"


def head_manifest(transport: RegistryTransport, ref: Reference) -> ManifestHead | None:
    """The manifest's digest without downloading it (HEADs are free of Docker Hub quota).

    Returns None when the registry has no such manifest. Only a registry that sends no
    ``Docker-Content-Digest`` costs a GET.
    """
    try:
        r = transport.request("HEAD", ref.api_host, _path(ref), reference=ref,
                              headers={"Accept": ACCEPT})
    except NotFound:
        return None
    digest = r.headers.get("Docker-Content-Digest")
    ctype = r.headers.get("Content-Type", "").split(";", 1)[0].strip()
    if ctype in SCHEMA1_TYPES:
        raise ManifestError(SCHEMA1_REFUSED, reference=str(ref))
    length = r.headers.get("Content-Length")
    size = int(length) if length and length.isdigit() else None
    if digest:
        return ManifestHead(digest, ctype, size)
    try:
        m = get_manifest(transport, ref)
    except NotFound:
        return None
    return ManifestHead(m.digest, m.media_type, len(m.raw), manifest=m)


def missing_manifest(transport: RegistryTransport, ref: Reference) -> NotFound:
    """What a 404 for ``ref``'s manifest means: no such repository, tag or digest.

    A bare 404 (HEAD has no body) does not say which; the repository's tag list does, and
    costs no Docker Hub pull quota. One attempt: when it fails too, the message says so.
    """
    try:
        transport.send("GET", ref.api_host, f"/v2/{ref.repository}/tags/list", params={"n": "1"}, reference=ref)
        exists: bool | None = True
    except NotFound:
        exists = False
    except RegistryError:
        exists = None  # denied, or no tag listing here: cannot tell
    return missing(ref, repository=exists)


def get_manifest(transport: RegistryTransport, ref: Reference, digest: str | None = None) -> Manifest:
    """Fetch ``ref`` (or ``digest`` in its repository), at most 4 MiB, verified when by digest."""
    want = digest or ref.digest
    target = ref.with_digest(want) if want else ref

    def fetch() -> tuple[bytes, str, str | None]:
        with transport.stream("GET", ref.api_host, _path(ref, want), reference=target,
                              headers={"Accept": ACCEPT}) as r:
            length = r.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > MAX_MANIFEST_BYTES:
                raise ManifestError(f"manifest is {int(length)} bytes; the limit is {MAX_MANIFEST_BYTES}",
                                    reference=str(target))
            buf = bytearray()
            for chunk in r.iter_bytes():
                buf += chunk
                if len(buf) > MAX_MANIFEST_BYTES:
                    raise ManifestError(f"manifest is larger than the {MAX_MANIFEST_BYTES}-byte limit",
                                        reference=str(target))
            return bytes(buf), r.headers.get("Content-Type", ""), r.headers.get("Docker-Content-Digest")

    try:
        raw, ctype, header_digest = transport.retry.call(fetch, what=f"GET manifest {target}")
    except NotFound as exc:
        if not want:
            raise
        raise NotFound(f"no manifest {want} in {ref.name}", codes=exc.codes, status=exc.status,
                       reference=str(target)) from None
    try:
        if want:
            algorithm = want.split(":", 1)[0]
            got = digest_of(raw, algorithm)
            if got != want:
                raise ManifestError(f"manifest body hashes to {got}, not the requested {want}")
            computed = want
        else:
            computed = sha256_digest(raw)
            if header_digest and header_digest.startswith("sha256:") and header_digest != computed:
                raise ManifestError(f"manifest body hashes to {computed} but the registry says "
                                    f"{header_digest}")
        return parse_manifest(raw, content_type=ctype, digest=computed)
    except ManifestError as exc:
        raise exc.with_reference(target) from None


def put_manifest(transport: RegistryTransport, ref: Reference, ref_str: str, manifest: Manifest) -> str:
    """Push the exact bytes under ``ref_str`` (a tag or the digest); returns the digest."""
    target = ref.with_digest(ref_str) if ":" in ref_str else ref.with_tag(ref_str).with_digest(None)
    r = transport.request("PUT", ref.api_host, _path(ref, ref_str), ok=(201, 200, 202), reference=target,
                          headers={"Content-Type": manifest.media_type}, content=manifest.raw,
                          what=f"PUT manifest {target}")
    pushed = r.headers.get("Docker-Content-Digest")
    if pushed and pushed.startswith("sha256:") and manifest.digest.startswith("sha256:") \
            and pushed != manifest.digest:
        raise ManifestError(f"registry stored the manifest as {pushed}, expected {manifest.digest}",
                            reference=str(target))
    return manifest.digest
