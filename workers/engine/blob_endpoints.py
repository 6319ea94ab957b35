"""The registry's blob endpoints (OCI Distribution), one call each: HEAD, GET (whole or a
range), cross-repository mount, and the upload session's POST, GET, PATCH, PUT and DELETE.

Each call is one attempt; retrying belongs to the caller, which knows whether a body can
be sent again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable

import httpx

from config.reference import Reference
from workers.engine.errors import DigestMismatch, NotFound, RegistryError
from workers.engine.transport import RegistryTransport

log = logging.getLogger(__name__)

_OCTETS = {"Content-Type": "application/octet-stream"}


def blob_exists(transport: RegistryTransport, ref: Reference, digest: str) -> bool:
    try:
        transport.request("HEAD", ref.api_host, f"/v2/{ref.repository}/blobs/{digest}", reference=ref)
    except NotFound:
        return False
    return True


def get_blob(transport: RegistryTransport, src: Reference, digest: str, start: int = 0,
             end: int | None = None) -> httpx.Response:
    """One streamed GET of the blob's bytes ``start``..``end`` (exclusive; None: to its end),
    200 or 206; the caller closes it. A range past the end means the blob is shorter than
    its descriptor."""
    headers = None
    if start or end is not None:
        headers = {"Range": f"bytes={start}-{'' if end is None else end - 1}"}
    try:
        return transport.send("GET", src.api_host, f"/v2/{src.repository}/blobs/{digest}", ok=(200, 206),
                              headers=headers, stream=True, reference=src)
    except RegistryError as exc:
        if exc.status == 416:
            raise DigestMismatch(f"blob {digest} at the source is shorter than its descriptor says",
                                 reference=str(src)) from None
        raise


def mount_blob(transport: RegistryTransport, dst: Reference, digest: str, from_repo: str) -> bool:
    """Whether the registry mounted ``digest`` from ``from_repo`` into ``dst``'s repository.
    A refusal answers False; only a temporary error raises."""
    try:
        r = transport.request(
            "POST", dst.api_host, f"/v2/{dst.repository}/blobs/uploads/",
            params={"mount": digest, "from": from_repo}, ok=(201, 202), reference=dst)
    except RegistryError as exc:
        if exc.temporary:
            raise
        log.info("mount of %s from %s refused: %s", digest, from_repo, exc)
        return False
    if r.status_code == 201:
        return True
    # 202: the registry opened a plain upload instead; do not leave it dangling.
    if r.headers.get("Location"):
        cancel_upload(transport, dst, transport.resolve(dst.api_host, r.headers["Location"]))
    return False


def start_upload(transport: RegistryTransport, dst: Reference) -> str:
    """Open an upload session; its absolute URL. Also earns the push token that the
    session's streamed requests then reuse."""
    r = transport.send("POST", dst.api_host, f"/v2/{dst.repository}/blobs/uploads/", ok=(202,), reference=dst)
    location = r.headers.get("Location")
    if not location:
        raise RegistryError("registry opened an upload without a Location", reference=str(dst))
    return transport.resolve(dst.api_host, location)


def upload_status(transport: RegistryTransport, dst: Reference, location: str) -> int | None:
    """The last byte index the session holds, or None when the registry does not say (or
    has forgotten the session)."""
    try:
        r = transport.send("GET", dst.api_host, location, ok=(204, 200), reference=dst)
    except NotFound:
        return None
    return _range_end(r.headers.get("Range"))


def send_chunk(transport: RegistryTransport, dst: Reference, location: str,
               body: Iterable[bytes]) -> tuple[str, int | None]:
    """PATCH one chunk; the session's next URL and the last byte index it now holds."""
    r = transport.send("PATCH", dst.api_host, location, ok=(202, 204), reference=dst, headers=_OCTETS,
                       content=body)
    if r.headers.get("Location"):
        location = transport.resolve(dst.api_host, r.headers["Location"])
    return location, _range_end(r.headers.get("Range"))


def commit_upload(transport: RegistryTransport, dst: Reference, location: str, digest: str,
                  body: bytes | Iterable[bytes] = b"") -> None:
    """PUT ``?digest=``, with the last bytes (or the whole blob) as ``body``."""
    url = httpx.URL(location).copy_merge_params({"digest": digest})
    transport.send("PUT", dst.api_host, url, ok=(201, 204), reference=dst, headers=_OCTETS, content=body)


def cancel_upload(transport: RegistryTransport, dst: Reference, location: str) -> None:
    """Best effort: a session left open only costs the registry until it expires."""
    with contextlib.suppress(RegistryError):
        transport.send("DELETE", dst.api_host, location, ok=(200, 202, 204, 404), reference=dst)


def _range_end(value: str | None) -> int | None:
    """Last byte index from an upload's ``Range: 0-N`` header."""
    if not value or "-" not in value:
        return None
    try:
        return int(value.rsplit("-", 1)[1])
    except ValueError:
        return None
