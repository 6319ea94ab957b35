"""One typed hierarchy for everything a registry (or the network to it) can do wrong.

``temporary`` tells the retry policy and the task layer whether trying again later
can help; everything else (not found, denied, corrupt content) is final.
"""

from __future__ import annotations

import email.utils
import json
import re
import ssl
import time
from collections.abc import Sequence

import httpx

from config.reference import Reference, name_of

# Error bodies are small JSON documents; never read more of one than this.
ERROR_BODY_LIMIT = 64 * 1024
# What Go's TLS servers (distribution among them) answer a plain HTTP request with.
_PLAIN_TO_TLS = b"Client sent an HTTP request to an HTTPS server"


class RegistryError(Exception):
    """A registry request that failed, with what the registry said about it."""

    default_temporary = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        codes: Sequence[str] = (),
        detail: object = None,
        url: str | None = None,
        reference: str | None = None,
        temporary: bool | None = None,
    ) -> None:
        self.message = message
        self.status = status
        self.codes = list(codes)
        self.detail = detail
        self.url = url
        self.reference = reference
        self._temporary = temporary
        super().__init__(message)

    @property
    def temporary(self) -> bool:
        return self.default_temporary if self._temporary is None else self._temporary

    @property
    def code(self) -> str:
        """The registry's first error code, or the class name when it gave none."""
        return self.codes[0] if self.codes else type(self).__name__

    def with_reference(self, reference: object) -> RegistryError:
        """Attach the image the failure concerns (kept if one is already set)."""
        if self.reference is None:
            self.reference = str(reference)
        return self

    def __str__(self) -> str:
        return f"{self.reference}: {self.message}" if self.reference else self.message

    def reason(self, about: object) -> str:
        """The error as it reads next to the image ``about``: the message alone when it concerns
        that image's repository (or nothing in particular), else naming what it concerns."""
        if self.reference is None or name_of(self.reference) == name_of(str(about)):
            return self.message
        return str(self)


class TransportError(RegistryError):
    """The connection failed, timed out or was cut before an answer."""

    default_temporary = True


class CertificateError(TransportError):
    """TLS with the registry failed over certificates: its certificate did not verify, or it wanted a
    client certificate. Final: the settings must change, trying again cannot help."""

    default_temporary = False


class RateLimited(RegistryError):
    """HTTP 429 / TOOMANYREQUESTS; ``retry_after`` is in seconds when the registry said."""

    default_temporary = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after


class ServerError(RegistryError):
    """A 5xx answer: usually an overloaded or restarting registry."""

    default_temporary = True


class Unauthorized(RegistryError):
    """401: no or wrong credentials."""


class Denied(RegistryError):
    """403: the credentials are not allowed to do this."""


class NotFound(RegistryError):
    """MANIFEST_UNKNOWN, BLOB_UNKNOWN, NAME_UNKNOWN, or a bare 404."""


def missing(ref: Reference, *, repository: bool | None) -> NotFound:
    """What is not there, said one way by both engines: the repository (``repository`` False), or
    the tag or digest in it (True; None when the registry would not say which)."""
    if repository is False:
        return NotFound(f"no repository {ref.name}", codes=["NAME_UNKNOWN"], status=404, reference=str(ref))
    what = f"manifest {ref.digest}" if ref.digest else f"tag {ref.tag}"
    unsure = "" if repository else " (or no such repository: the registry does not say which)"
    return NotFound(f"no {what} in {ref.name}{unsure}", codes=["MANIFEST_UNKNOWN"], status=404, reference=str(ref))


class InvalidRequest(RegistryError):
    """400 or another 4xx the registry refused for a reason in its body."""


class DigestMismatch(RegistryError):
    """Content does not hash to (or is not the size of) its digest; never committed."""


class ManifestError(RegistryError):
    """A manifest ferry will not copy: schema 1, too large, malformed, or the wrong digest."""


class UnsupportedMediaType(RegistryError):
    """415, or a media type the destination refuses."""


_CODE_CLASSES: dict[str, type[RegistryError]] = {
    "MANIFEST_UNKNOWN": NotFound,
    "BLOB_UNKNOWN": NotFound,
    "NAME_UNKNOWN": NotFound,
    "BLOB_UPLOAD_UNKNOWN": NotFound,
    "UNAUTHORIZED": Unauthorized,
    "DENIED": Denied,
    "TOOMANYREQUESTS": RateLimited,
    "DIGEST_INVALID": DigestMismatch,
    "SIZE_INVALID": DigestMismatch,
    "MANIFEST_INVALID": ManifestError,
    "MANIFEST_BLOB_UNKNOWN": InvalidRequest,
    "UNSUPPORTED": UnsupportedMediaType,
}
# Registries that answer 404/401/... with no JSON still get a readable message.
_STATUS_MESSAGES = {
    400: "bad request",
    401: "authentication required",
    403: "access denied",
    404: "not found",
    405: "operation not supported by this registry",
    408: "request timed out",
    413: "request too large",
    415: "unsupported media type",
    416: "requested range not satisfiable",
    429: "too many requests",
}


def _class_for_status(status: int) -> type[RegistryError]:
    if status == 401:
        return Unauthorized
    if status == 403:
        return Denied
    if status == 404:
        return NotFound
    if status == 408:
        return TransportError
    if status == 415:
        return UnsupportedMediaType
    if status == 429:
        return RateLimited
    if status >= 500:
        return ServerError
    return InvalidRequest


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def read_capped(response: httpx.Response, limit: int = ERROR_BODY_LIMIT) -> bytes:
    """At most ``limit`` bytes of the body, whether or not it was streamed."""
    try:
        return response.content[:limit]
    except httpx.ResponseNotRead:
        pass
    buf = bytearray()
    try:
        for chunk in response.iter_bytes():
            buf += chunk
            if len(buf) >= limit:
                break
    except (httpx.HTTPError, httpx.StreamError):
        pass  # the status line is what matters; a cut error body is fine
    return bytes(buf[:limit])


def _parse_errors(body: bytes) -> tuple[list[str], list[str], object]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return [], [], None
    entries = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        return [], [], None
    codes: list[str] = []
    messages: list[str] = []
    detail: object = None
    for e in entries:
        if not isinstance(e, dict):
            continue
        if isinstance(e.get("code"), str):
            codes.append(e["code"])
        if isinstance(e.get("message"), str) and e["message"]:
            messages.append(e["message"])
        if detail is None and e.get("detail") is not None:
            detail = e["detail"]
    return codes, messages, detail


def error_from_response(
    response: httpx.Response, *, reference: object = None, body_limit: int = ERROR_BODY_LIMIT
) -> RegistryError:
    """The typed error for a non-success answer, reading at most ``body_limit`` bytes of it."""
    status = response.status_code
    body = read_capped(response, body_limit)
    if status == 400 and _plain_to_tls(response, body):
        host = response.request.url.netloc.decode("ascii", "replace") if _has_request(response) else "the registry"
        return InvalidRequest(
            f"{host} speaks only HTTPS, and ferry spoke plain HTTP to it (as to every loopback registry "
            f"without TLS settings) — set ca_file (or insecure) for {host} in FERRY_REGISTRIES",
            status=status, reference=str(reference) if reference is not None else None)
    codes, messages, detail = _parse_errors(body)
    cls = next((_CODE_CLASSES[c] for c in codes if c in _CODE_CLASSES), None)
    if cls is None or (cls is NotFound and status >= 500):
        cls = _class_for_status(status)
    message = "; ".join(dict.fromkeys(m.lower() for m in messages))
    if not message:
        message = _STATUS_MESSAGES.get(status) or f"HTTP {status} {response.reason_phrase}".strip()
    if isinstance(detail, (str, int, float)) and str(detail) and str(detail) not in message:
        message += f" ({detail})"
    kw: dict[str, object] = {
        "status": status,
        "codes": codes,
        "detail": detail,
        "url": _safe_url(response.request.url) if _has_request(response) else None,
        "reference": str(reference) if reference is not None else None,
    }
    if cls is RateLimited:
        return RateLimited(message, retry_after=parse_retry_after(response.headers.get("Retry-After")), **kw)
    if status == 501:
        kw["temporary"] = False
    return cls(message, **kw)  # type: ignore[arg-type]


def _plain_to_tls(response: httpx.Response, body: bytes) -> bool:
    """Go's TLS servers answer plain HTTP with a bare HTTP/1.0 400: no headers, and this body
    (which a HEAD does not get)."""
    return body.startswith(_PLAIN_TO_TLS) or (response.http_version == "HTTP/1.0" and not response.headers)


def _has_request(response: httpx.Response) -> bool:
    try:
        response.request  # noqa: B018 - raises when the response was built by hand
    except RuntimeError:
        return False
    return True


def _safe_url(url: httpx.URL) -> str:
    """The URL without its query string (upload URLs carry state tokens)."""
    return str(url.copy_with(query=None))


def transport_error(
    exc: httpx.HTTPError, *, url: str | None = None, reference: object = None
) -> TransportError:
    """A connection-level failure (or a body that would not decode), named the way a person
    would describe it, with the host it happened with. A certificate failure is final."""
    text = str(exc)
    host = _host(exc, url) or "the registry"
    refused = certificate_problem(exc, host)
    if refused is not None:
        return CertificateError(refused, url=url, reference=str(reference) if reference is not None else None)
    kinds: dict[type[httpx.HTTPError], str] = {
        httpx.ConnectTimeout: f"connection to {host} timed out",
        httpx.ReadTimeout: f"read from {host} timed out",
        httpx.WriteTimeout: f"write to {host} timed out",
        httpx.PoolTimeout: f"timed out waiting for a free connection to {host}",
        httpx.ConnectError: f"cannot connect to {host}",
        httpx.RemoteProtocolError: f"{host} closed the connection unexpectedly",
        httpx.ReadError: f"connection to {host} reset while reading",
        httpx.WriteError: f"connection to {host} reset while writing",
        httpx.DecodingError: f"response body from {host} could not be decoded",
    }
    if isinstance(exc, httpx.ConnectError) and "refused" in text.lower():
        message = f"connection refused to {host}"
    elif isinstance(exc, httpx.ConnectError) and _NAME_RESOLUTION.search(text):
        message = f"cannot resolve {_hostname(host)}"
    else:
        kind = kinds.get(type(exc), f"network error with {host}")
        message = f"{kind}: {text}" if text and text not in kind else kind
    return TransportError(
        message,
        url=url,
        reference=str(reference) if reference is not None else None,
        # A bad URL scheme will not fix itself.
        temporary=False if isinstance(exc, httpx.UnsupportedProtocol) else None,
    )


# TLS alerts a server sends when it wanted a client certificate and got none (or one it rejects).
_CLIENT_CERT_ALERTS = ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA", "CERTIFICATE_UNKNOWN",
                       "CERTIFICATE_EXPIRED", "CERTIFICATE_REVOKED", "ACCESS_DENIED")


def ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """The ``ssl.SSLError`` underneath an httpx error (httpx and httpcore chain the original)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def certificate_problem(exc: BaseException, host: str) -> str | None:
    """What went wrong and what to do, when ``exc`` is a certificate failure with ``host``; else None."""
    cause = ssl_cause(exc)
    if isinstance(cause, ssl.SSLCertVerificationError):
        why = cause.verify_message or cause.reason or str(cause)
        return (f"certificate verify failed for {host}: {why} — set ca_file for {host} in FERRY_REGISTRIES "
                "(or list it as insecure)")
    reason = (cause.reason or "") if cause is not None else ""
    if cause is not None and any(alert in reason.upper() for alert in _CLIENT_CERT_ALERTS):
        return (f"TLS refused by {host}: it requires a client certificate it accepts "
                f"({reason.lower().replace('_', ' ')}) — set client_cert and client_key for {host} "
                "in FERRY_REGISTRIES")
    return None


_NAME_RESOLUTION = re.compile(r"name or service not known|nodename nor servname|name resolution|"
                              r"no address associated", re.IGNORECASE)


def _host(exc: httpx.HTTPError, url: str | None) -> str | None:
    """``host[:port]`` of the request that failed."""
    try:
        target = httpx.URL(url) if url else exc.request.url
    except (RuntimeError, httpx.InvalidURL):
        return None
    return target.netloc.decode("ascii", "replace") or None


def _hostname(host: str) -> str:
    try:
        return httpx.URL(f"//{host}").host or host
    except httpx.InvalidURL:
        return host
