"""Referrers: the signatures, attestations and SBOMs that point at an image, copied with it.

A registry keeps them in one of three ways, all read for each subject digest:
- the OCI 1.1 referrers API, ``GET /v2/<name>/referrers/<digest>``: an index of descriptors;
- where that API is missing (404), the referrers tag schema: an index tagged ``sha256-<hex>``;
- cosign's tags ``sha256-<hex>.sig``, ``.att`` and ``.sbom``.

Every referrer is pushed byte for byte, so signatures still verify at the destination. A
destination without the API also gets the tag schema index (the source's own bytes when it
had one and the destination held nothing else), so tools that look there find them.
Referrers of referrers are not followed.

The tag schema and cosign's tags are found in the repository's tag list, read once per
repository per batch in each worker process (``scope``), instead of four HEADs per subject
digest, almost all answered 404: a warm image costs no referrer request at all where the
registry lacks the API. The trade-off: a signature pushed to the source while a batch runs is
seen by the next batch, not necessarily by this one (as if the image had been copied before it
was signed). Repositories with more than ``LISTED_TAGS_LIMIT`` tags, registries that refuse the
listing, and callers without a scope fall back to the HEADs.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from config.jobs import DestinationResult
from config.reference import Reference
from workers.engine.blobs import BlobCopier
from workers.engine.copy import CopyOutcome, copy_plan, plan_image
from workers.engine.errors import ManifestError, NotFound, RegistryError
from workers.engine.manifests import (
    IMAGE_TYPES,
    MANIFEST_TYPES,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    Manifest,
    get_manifest,
    head_manifest,
    parse_manifest,
    put_manifest,
    sha256_digest,
)
from workers.engine.protocols import ProgressFn
from workers.engine.tags import list_tags_upto
from workers.engine.transport import RegistryTransport

log = logging.getLogger(__name__)

COSIGN_SUFFIXES = (".sig", ".att", ".sbom")
# buildx lists its attestation manifests inside the index; they are referrers themselves.
_REFERENCE_TYPE = "vnd.docker.reference.type"
# A referrers listing longer than this many pages is not a listing.
MAX_PAGES = 32
# Beyond this many tags, listing a repository costs more than the HEADs it saves.
LISTED_TAGS_LIMIT = 5000
LISTED_PAGE_SIZE = 1000
# Repositories whose listing a worker process remembers (the most recent batches' ones).
LISTED_REPOSITORIES = 512


@dataclass
class Found:
    """What the source holds for one subject digest."""

    subject: str
    # Descriptors from the referrers API or the tag schema index, as the source wrote them.
    listed: list[dict[str, Any]] = field(default_factory=list)
    # The source's tag schema index, when it keeps one.
    tag_index: Manifest | None = None
    # cosign tag -> the digest it points at.
    cosign: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.listed or self.cosign)


@dataclass
class Carried:
    """What one destination received: referrer manifests pushed and their blob bytes."""

    pushed: int = 0
    uploaded: int = 0
    downloaded: int = 0


def schema_tag(digest: str) -> str:
    """``sha256:<hex>`` → ``sha256-<hex>``, the tag both the tag schema and cosign build on."""
    algorithm, _, hex_ = digest.partition(":")
    return f"{algorithm}-{hex_}"


def subjects(root: Manifest, built: bool) -> list[str]:
    """The digests whose referrers go along: the root unless it was built here (a filtered
    index exists nowhere else), and the image children of an index."""
    found = [] if built else [root.digest]
    if root.is_index:
        entries = root.doc.get("manifests", [])
        for entry, child in zip(entries, root.children, strict=True):
            if (entry.get("annotations") or {}).get(_REFERENCE_TYPE) != "attestation-manifest":
                found.append(child.digest)
    return list(dict.fromkeys(found))


class ReferrerCopier:
    """Finds an image's referrers at the source and pushes them to destinations; one per engine."""

    def __init__(self, transport: RegistryTransport, copier: BlobCopier) -> None:
        self.transport = transport
        self.copier = copier
        # Registries that answered 404 to the referrers API: asked once per process.
        self._no_api: set[str] = set()
        # (scope, registry, repository) -> its ``sha256-…`` tags, or None: not listable, ask by HEAD.
        self._schema_tags: OrderedDict[tuple[str, str, str], frozenset[str] | None] = OrderedDict()
        self._listing: dict[tuple[str, str, str], threading.Lock] = {}
        self._lock = threading.Lock()

    # -- the source -----------------------------------------------------------------

    def find(self, src: Reference, digests: Sequence[str], executor: Executor,
             scope: str | None = None) -> list[Found]:
        """Every subject's referrers, looked up together on ``executor`` (HEADs for cosign's tags
        are free of quota). With a ``scope`` (a batch), tags the repository's listing lacks are not
        asked for; what needs no request is not handed to the executor at all."""
        tags = self.schema_tags(src, scope) if scope is not None else None

        def may_exist(tag: str) -> bool:
            return tags is None or tag in tags

        nothing: Future[tuple[list[dict[str, Any]], Manifest | None]] = Future()
        nothing.set_result(([], None))
        listings = [executor.submit(self._listed, src, d, may_exist(schema_tag(d)))
                    if src.api_host not in self._no_api or may_exist(schema_tag(d)) else nothing
                    for d in digests]
        cosign = {(d, s): executor.submit(head_manifest, self.transport, _tagged(src, schema_tag(d) + s))
                  for d in digests for s in COSIGN_SUFFIXES if may_exist(schema_tag(d) + s)}
        found = []
        for digest, listing in zip(digests, listings, strict=True):
            listed, tag_index = listing.result()
            f = Found(digest, listed, tag_index)
            for suffix in COSIGN_SUFFIXES:
                head = cosign[digest, suffix].result() if (digest, suffix) in cosign else None
                if head is not None:
                    f.cosign[schema_tag(digest) + suffix] = head.digest
            found.append(f)
        return found

    def schema_tags(self, ref: Reference, scope: str, *, ahead: bool = False) -> frozenset[str] | None:
        """The repository's tags that start like a schema or cosign tag, listed once per ``scope``
        by this process (concurrent callers wait for the first); None when it cannot be listed
        cheaply. ``ahead``: asked before the copy needs it, so one attempt, and a failure is not
        kept (the lookup after the copy asks again, with retries)."""
        key = (scope, ref.api_host, ref.repository)
        with self._lock:
            if key in self._schema_tags:
                return self._schema_tags[key]
            lock = self._listing.setdefault(key, threading.Lock())
        with lock:
            try:
                with self._lock:
                    if key in self._schema_tags:
                        return self._schema_tags[key]
                try:
                    tags = list_tags_upto(self.transport, ref, LISTED_TAGS_LIMIT,
                                          page_size=LISTED_PAGE_SIZE, once=ahead)
                except RegistryError as exc:  # denied or odd: the HEADs still work
                    if ahead:
                        return None
                    log.debug("%s: tags not listed (%s); looking up referrer tags one by one", ref.name, exc)
                    tags = None
                found = None if tags is None else frozenset(t for t in tags if t.startswith("sha256-"))
                with self._lock:
                    self._schema_tags[key] = found
                    while len(self._schema_tags) > LISTED_REPOSITORIES:
                        self._schema_tags.popitem(last=False)
                return found
            finally:
                with self._lock:  # however the listing ended, its lock is not kept
                    if self._listing.get(key) is lock:
                        del self._listing[key]

    def _listed(self, ref: Reference, digest: str, tagged: bool = True) -> tuple[list[dict[str, Any]], Manifest | None]:
        """``tagged``: whether the tag schema's index may exist (False: the tag list lacks it)."""
        listed = self._api(ref, digest)
        if listed is not None:
            return listed, None
        index = self._tag_index(ref, digest) if tagged else None
        return (_entries(index), index) if index is not None else ([], None)

    def _api(self, ref: Reference, digest: str) -> list[dict[str, Any]] | None:
        """The referrers API's listing, following ``Link`` pages; None where the registry lacks the API."""
        host = ref.api_host
        if host in self._no_api:
            return None
        url = f"/v2/{ref.repository}/referrers/{digest}"
        listed: list[dict[str, Any]] = []
        for _ in range(MAX_PAGES):
            try:
                r = self.transport.request("GET", host, url, reference=ref.with_digest(digest),
                                           headers={"Accept": OCI_INDEX}, what=f"GET referrers of {digest}")
            except RegistryError as exc:
                # The spec forbids a 404 from a registry that has the API.
                if listed or not (isinstance(exc, NotFound) or exc.status == 405):
                    raise
                self._no_api.add(host)
                return None
            if len(r.content) > MAX_MANIFEST_BYTES:
                raise ManifestError(f"referrers listing of {digest} is larger than {MAX_MANIFEST_BYTES} bytes",
                                    reference=str(ref))
            listed += _entries(parse_manifest(r.content, content_type=OCI_INDEX))
            nxt = _next_link(r.headers.get("Link"))
            if nxt is None:
                return listed
            url = nxt
        raise ManifestError(f"referrers listing of {digest} runs past {MAX_PAGES} pages", reference=str(ref))

    def _tag_index(self, ref: Reference, digest: str) -> Manifest | None:
        tagged = _tagged(ref, schema_tag(digest))
        if head_manifest(self.transport, tagged) is None:
            return None
        index = get_manifest(self.transport, tagged)
        if not index.is_index:
            raise ManifestError(f"the referrers tag {schema_tag(digest)} is not an index", reference=str(tagged))
        return index

    # -- a destination --------------------------------------------------------------

    def carry(self, src: Reference, found: Sequence[Found], dst: Reference, progress: ProgressFn | None,
              expect: ProgressFn | None = None, *, use_cache: bool, executor: Executor) -> Carried:
        """Push to ``dst``'s repository every referrer in ``found`` that it lacks."""
        carried = Carried()
        for f in found:
            if not f:
                continue
            present, api = self._destination(dst, f.subject) if f.listed else (set(), False)
            for entry in f.listed:
                digest = entry["digest"]
                if entry.get("mediaType") not in MANIFEST_TYPES:
                    log.warning("%s: referrer %s has media type %r; not copied", src, digest, entry.get("mediaType"))
                    continue
                at = dst.with_digest(digest).with_tag(None)
                if digest in present or (not api and head_manifest(self.transport, at) is not None):
                    continue
                self._push(src.with_digest(digest), at, progress, expect, use_cache, carried, executor)
            for tag, digest in f.cosign.items():
                at = _tagged(dst, tag)
                head = head_manifest(self.transport, at)
                if head is None or head.digest != digest:
                    self._push(src.with_digest(digest).with_tag(None), at, progress, expect, use_cache, carried,
                               executor)
            if f.listed and not api:
                self._write_tag_index(f, dst)
        return carried

    def _destination(self, dst: Reference, subject: str) -> tuple[set[str], bool]:
        """Digests the destination already lists for ``subject``, and whether it has the API
        (then it indexes what is pushed by itself)."""
        listed = self._api(dst, subject)
        return ({e["digest"] for e in listed}, True) if listed is not None else (set(), False)

    def _push(self, src: Reference, dst: Reference, progress: ProgressFn | None, expect: ProgressFn | None,
              use_cache: bool, carried: Carried, executor: Executor) -> None:
        manifest = get_manifest(self.transport, src)
        plan = plan_image(self.transport, src, manifest, executor)
        result, downloaded = copy_plan(self.transport, self.copier, executor, src, dst, plan, progress, expect,
                                       use_cache=use_cache)
        carried.pushed += 1
        carried.uploaded += result.bytes_transferred
        carried.downloaded += downloaded

    def _write_tag_index(self, f: Found, dst: Reference) -> None:
        """The destination's ``sha256-<hex>`` index: the source's bytes, plus whatever the
        destination listed that the source does not (then rebuilt, with new bytes)."""
        tagged = _tagged(dst, schema_tag(f.subject))
        current = self._tag_index(dst, f.subject)
        mine = {e["digest"] for e in f.listed}
        extra = [e for e in (_entries(current) if current else []) if e["digest"] not in mine]
        if f.tag_index is not None and not extra:
            want = f.tag_index
        else:
            if current is not None and {e["digest"] for e in _entries(current)} == mine:
                return
            raw = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": f.listed + extra},
                             indent=2).encode()
            want = parse_manifest(raw, content_type=OCI_INDEX, digest=sha256_digest(raw))
        if current is None or current.digest != want.digest:
            put_manifest(self.transport, tagged, schema_tag(f.subject), want)


def carry_referrers(referrers: ReferrerCopier, src: Reference, dsts: Sequence[Reference], outcome: CopyOutcome,
                    progress: ProgressFn | None, expect: ProgressFn | None = None, *, use_cache: bool,
                    executor: Executor, scope: str | None = None) -> None:
    """After an image copy: bring its referrers to every destination that did not fail, and
    fold what that did into ``outcome`` (a destination whose referrers fail, fails). ``scope``:
    the batch, within which a repository's tag list is read once."""
    ok = [d for d in dsts if str(d) not in outcome.failures]
    if not ok or outcome.source_digest is None:
        return
    src = src.with_digest(outcome.source_digest)
    root = outcome.root
    if root is None and outcome.source_media_type not in IMAGE_TYPES:
        # Up to date everywhere, and maybe an index: the destination holds the same bytes, and
        # reading them there costs no source quota.
        root = get_manifest(referrers.transport, ok[0], outcome.source_digest)
    found = referrers.find(src, subjects(root, outcome.root_built) if root else [outcome.source_digest], executor,
                           scope)
    if not any(found):
        return
    results = {r.destination: i for i, r in enumerate(outcome.destinations)}
    for dst in ok:
        i = results[str(dst)]
        try:
            carried = referrers.carry(src, found, dst, progress, expect, use_cache=use_cache, executor=executor)
        except RegistryError as exc:
            exc.with_reference(dst)
            outcome.failures[str(dst)] = exc
            outcome.destinations[i] = DestinationResult(
                destination=str(dst), status="failed",
                error=f"copying signatures, attestations or SBOMs: {exc.reason(dst)} (--no-referrers skips them)")
            continue
        before = outcome.destinations[i]
        outcome.destinations[i] = before.model_copy(update={
            "status": "synced" if carried.pushed else before.status,
            "referrers_copied": carried.pushed,
            "bytes_transferred": before.bytes_transferred + carried.uploaded,
        })
        outcome.bytes_uploaded += carried.uploaded
        outcome.bytes_downloaded += carried.downloaded


def _tagged(ref: Reference, tag: str) -> Reference:
    return ref.with_tag(tag).with_digest(None)


def _entries(index: Manifest) -> list[dict[str, Any]]:
    # parse_manifest already checked every descriptor.
    return list(index.doc.get("manifests", []))


def _next_link(header: str | None) -> str | None:
    """The path of a ``Link: <url>; rel="next"`` header, kept on the same registry."""
    if not header:
        return None
    for part in header.split(","):
        target, _, params = part.partition(";")
        if 'rel="next"' in params.replace(" ", "") or "rel=next" in params.replace(" ", ""):
            url = urlsplit(target.strip().strip("<>"))
            return url.path + (f"?{url.query}" if url.query else "")
    return None
