"""A repository's tags: the paginated ``tags/list`` and deleting a manifest by tag or digest.

Pages are asked for with ``n`` and followed through ``Link: <...>; rel="next"`` headers; a
registry that ignores ``n`` answers everything in one page. Every request goes through the
transport, so cluster limits, quota pauses and retries apply as for copies.
"""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit

from config.reference import Reference
from workers.engine.errors import RegistryError
from workers.engine.transport import RegistryTransport

DEFAULT_PAGE_SIZE = 100
# No real repository has more; a registry that keeps answering "next" is broken.
MAX_TAGS = 1_000_000
_NEXT_RE = re.compile(r'<([^>]+)>\s*;[^,]*\brel="?next"?', re.IGNORECASE)


def next_link(header: str | None) -> str | None:
    """The path and query of a ``Link`` header's ``rel="next"`` target, or None."""
    if not header:
        return None
    m = _NEXT_RE.search(header)
    if m is None:
        return None
    parts = urlsplit(m.group(1))
    path = parts.path if parts.path.startswith("/") else "/" + parts.path
    return path + (f"?{parts.query}" if parts.query else "")


def list_tags(transport: RegistryTransport, repo: Reference, *, page_size: int = DEFAULT_PAGE_SIZE) -> list[str]:
    """Every tag of ``repo``'s repository, in the registry's order, each once. Raises NotFound
    when the repository does not exist."""
    tags = list_tags_upto(transport, repo, MAX_TAGS, page_size=page_size)
    if tags is None:
        raise RegistryError(f"the tag list does not end (over {MAX_TAGS} tags)", reference=repo.name)
    return tags


def list_tags_upto(transport: RegistryTransport, repo: Reference, limit: int, *,
                   page_size: int = DEFAULT_PAGE_SIZE, once: bool = False) -> list[str] | None:
    """Like ``list_tags``, but None as soon as the repository turns out to hold more than ``limit``
    tags (no further pages are asked for). ``once``: no request is retried."""
    url = f"/v2/{repo.repository}/tags/list?n={page_size}"
    tags: dict[str, None] = {}
    seen: set[str] = set()
    while True:
        seen.add(url)
        r = transport.send("GET", repo.api_host, url, reference=repo.name) if once else \
            transport.request("GET", repo.api_host, url, reference=repo.name, what=f"GET tags of {repo.name}")
        for tag in _page(r.content, repo):
            tags[tag] = None
        if len(tags) > limit:
            return None
        url_next = next_link(r.headers.get("Link"))
        if url_next is None:
            return list(tags)
        if url_next in seen:
            raise RegistryError(f"the tag list does not end (page {url_next} again)", reference=repo.name)
        url = url_next


def _page(body: bytes, repo: Reference) -> list[str]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RegistryError("the tag list is not JSON", reference=repo.name) from None
    tags = doc.get("tags") if isinstance(doc, dict) else None
    if tags is None and isinstance(doc, dict):
        return []  # distribution answers "tags": null for a repository whose tags were all deleted
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise RegistryError("the tag list has no list of tag names", reference=repo.name)
    return tags


def delete_manifest(transport: RegistryTransport, repo: Reference, ref: str) -> None:
    """``DELETE /v2/<name>/manifests/<tag or digest>``: a tag alone where the registry supports it;
    by digest, the manifest and every tag on it."""
    transport.request("DELETE", repo.api_host, f"/v2/{repo.repository}/manifests/{ref}", ok=(200, 202, 204),
                      reference=f"{repo.name}:{ref}" if ":" not in ref else f"{repo.name}@{ref}",
                      what=f"DELETE {repo.name} {ref}")
