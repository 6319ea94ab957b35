"""Paginated ``tags/list`` for tests, over a real registry's tags.

distribution 2.8 (Debian's docker-registry) ignores ``n`` and answers every tag at once. Registries
that page (distribution 3, Docker Hub, Harbor, GHCR) sort tags, return at most ``n`` after ``last``
and point at the next page with a ``Link: <...>; rel="next"`` header, capping ``n`` at their own
maximum. This in-test implementation does the same in front of the real registry, through the
fault proxy: the tag names come from the registry itself, only the paging is added here.
"""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx

from tests.support.faultproxy import Respond, Rule, Status

TAGS_PATH = r"^/v2/.+/tags/list"


def paginated_tags(upstream: str, max_page: int) -> Rule:
    """A proxy rule answering ``tags/list`` pages of at most ``min(n, max_page)`` tags."""

    def answer(method: str, target: str) -> Status:
        parts = urlsplit(target)
        name = re.sub(r"^/v2/|/tags/list$", "", parts.path)
        query = parse_qs(parts.query)
        r = httpx.get(f"http://{upstream}{parts.path}", timeout=30)
        if r.status_code != 200:
            return Status(r.status_code, {"Content-Type": "application/json"}, r.content)
        tags = sorted(r.json().get("tags") or [])
        n = min(int(query.get("n", [str(max_page)])[0]), max_page)
        last = query.get("last", [""])[0]
        page = [t for t in tags if t > last][:n]
        headers = {"Content-Type": "application/json"}
        if page and page[-1] != tags[-1]:
            nxt = urlencode({"n": n, "last": page[-1]})
            headers["Link"] = f'</v2/{name}/tags/list?{nxt}>; rel="next"'
        return Status(200, headers, json.dumps({"name": name, "tags": page}).encode())

    return Rule(Respond(answer), method="GET", path_re=TAGS_PATH)
