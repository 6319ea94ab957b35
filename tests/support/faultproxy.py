"""A fault-injecting HTTP/1.1 reverse proxy in front of a real registry, driven by tests.

It runs its own asyncio loop in a thread on a free loopback port. Rules pick requests by
method and path and apply actions (answer directly, hang up, cut or corrupt the response
body, stall, add latency). Every request is recorded for counting and rate checks.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import re
import threading
import time
import traceback
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType

import pytest

PIECE = 64 * 1024
Headers = list[tuple[str, str]]


# ---- actions ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Status:
    """Answer with this response without forwarding (the request body is read and dropped)."""

    code: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class Hangup:
    """Close the connection without sending any response."""


@dataclass(frozen=True)
class DropAfter:
    """Forward, then close the connection after ``nbytes`` of the response body."""

    nbytes: int


@dataclass(frozen=True)
class Corrupt:
    """Forward, flipping every bit of the response body byte at ``offset``."""

    offset: int


@dataclass(frozen=True)
class Stall:
    """Forward, pausing ``seconds`` once ``after`` bytes of the response body were sent."""

    seconds: float
    after: int = 0


@dataclass(frozen=True)
class Delay:
    """Wait ``seconds`` before forwarding (or before answering, combined with Status)."""

    seconds: float


@dataclass(frozen=True)
class Truncate:
    """Forward only the first ``nbytes`` of the response body, framed as a complete response."""

    nbytes: int


@dataclass(frozen=True)
class Throttle:
    """Forward, sending the response body no faster than ``bytes_per_second`` (one connection's share
    of a long-distance link)."""

    bytes_per_second: float


@dataclass(frozen=True)
class AddHeaders:
    """Forward, adding these headers to the upstream's response (e.g. a registry's quota headers)."""

    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Respond:
    """Answer with what ``make(method, target)`` returns, computed off the proxy loop (it may block),
    without forwarding: a small in-test server for one endpoint in front of a real registry."""

    make: Callable[[str, str], Status]


Action = Status | Hangup | DropAfter | Corrupt | Stall | Delay | Truncate | Throttle | AddHeaders | Respond


def status(code: int, headers: dict[str, str] | None = None, body: bytes = b"") -> Status:
    return Status(code, dict(headers or {}), body)


def too_many_requests(retry_after: str | None = "1") -> Status:
    """A registry-style 429 with an OCI error body."""
    headers = {"Content-Type": "application/json"}
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    body = b'{"errors":[{"code":"TOOMANYREQUESTS","message":"rate limited","detail":null}]}'
    return Status(429, headers, body)


def hangup() -> Hangup:
    return Hangup()


def drop_after(nbytes: int) -> DropAfter:
    return DropAfter(nbytes)


def corrupt(offset: int = 0) -> Corrupt:
    return Corrupt(offset)


def stall(seconds: float, after: int = 0) -> Stall:
    return Stall(seconds, after)


def delay(seconds: float) -> Delay:
    return Delay(seconds)


def throttle(bytes_per_second: float) -> Throttle:
    return Throttle(bytes_per_second)


def add_headers(headers: dict[str, str]) -> AddHeaders:
    return AddHeaders(tuple(headers.items()))


@dataclass
class Rule:
    """Applies ``action`` to the first ``times`` matching requests (all of them when None)."""

    action: Action | tuple[Action, ...]
    method: str | None = None
    path_re: str | None = None
    times: int | None = None
    hits: int = 0

    @property
    def actions(self) -> tuple[Action, ...]:
        return self.action if isinstance(self.action, tuple) else (self.action,)

    def matches(self, method: str, target: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        return self.path_re is None or re.search(self.path_re, target) is not None


@dataclass
class Seen:
    """One request as the proxy saw it; status stays 0 when no response head was sent."""

    method: str
    path: str
    start: float
    status: int = 0
    end: float | None = None
    faults: tuple[str, ...] = ()
    range: str | None = None  # the request's Range header


def max_in_window(times: Sequence[float], window: float) -> int:
    """The largest number of ``times`` falling in any half-open interval of length ``window``."""
    ts = sorted(times)
    return max((bisect.bisect_left(ts, t + window) - i for i, t in enumerate(ts)), default=0)


class _Cut(Exception):
    """The connection is to be closed on purpose (a fault, or a close-delimited body)."""


# ---- the proxy -------------------------------------------------------------------------------

class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream  # "host:port"
        self.port = 0
        self.connections = 0  # client connections accepted: shows keep-alive reuse
        self.errors: list[str] = []  # unexpected proxy-side exceptions; tests assert it stays empty
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._seen: list[Seen] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Every open client and upstream stream, so stop() can cut them all at once.
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # -- lifecycle

    def start(self) -> FaultProxy:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name=f"faultproxy-{self.upstream}",
                                        daemon=True)
        self._thread.start()
        serve = asyncio.start_server(self._client, "127.0.0.1", 0)
        self._server = asyncio.run_coroutine_threadsafe(serve, loop).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        self._loop = self._thread = self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start() if self._loop is None else self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        # A connection accepted just before close() may not have started its handler yet, and
        # wait_closed() waits for it: sweep a few times so late handlers are cancelled too.
        quiet = 0
        while quiet < 3:
            for w in list(self._writers):  # a cut stream wakes whatever awaits it
                w.transport.abort()
            tasks = [t for t in self._tasks if not t.done()]
            quiet = 0 if tasks else quiet + 1
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=2)
            await asyncio.sleep(0.01)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 5)

    # -- rules and records (called from test threads)

    def add_rule(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()

    def reset_counts(self) -> None:
        with self._lock:
            self._seen.clear()

    @property
    def requests(self) -> list[Seen]:
        with self._lock:
            return [dataclasses.replace(s) for s in self._seen]

    def select(self, method: str | None = None, path_re: str | None = None,
               status: int | None = None) -> list[Seen]:
        return [s for s in self.requests
                if (method is None or s.method == method.upper())
                and (path_re is None or re.search(path_re, s.path))
                and (status is None or s.status == status)]

    def count(self, method: str | None = None, path_re: str | None = None,
              status: int | None = None) -> int:
        return len(self.select(method, path_re, status))

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until every recorded request is finished (``end`` lands just after the last byte)."""
        deadline = time.monotonic() + timeout
        while any(s.end is None for s in self.requests):
            if time.monotonic() > deadline:
                raise TimeoutError("requests still in flight through the proxy")
            time.sleep(0.01)

    def max_rate(self, window: float, method: str | None = None, path_re: str | None = None) -> int:
        """Most matching requests that arrived within any ``window`` seconds."""
        return max_in_window([s.start for s in self.select(method, path_re)], window)

    def max_in_flight(self, method: str | None = None, path_re: str | None = None) -> int:
        """Peak number of matching requests being served at the same time."""
        events: list[tuple[float, int]] = []
        for s in self.select(method, path_re):
            events += [(s.start, 1), (s.end if s.end is not None else float("inf"), -1)]
        peak = cur = 0
        for _, d in sorted(events):  # at equal times, -1 sorts first: back-to-back is not overlap
            cur += d
            peak = max(peak, cur)
        return peak

    def _match(self, method: str, target: str) -> tuple[Action, ...]:
        with self._lock:
            for rule in self._rules:
                if rule.matches(method, target):
                    rule.hits += 1
                    return rule.actions
        return ()

    def _update(self, seen: Seen, **changes: object) -> None:
        with self._lock:
            for k, v in changes.items():
                setattr(seen, k, v)

    # -- serving (proxy thread)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        clean = False
        try:
            first = await reader.read(1)
            if first == b"\x16":
                # A TLS ClientHello (docker tries https first): refuse at once, as Go servers do,
                # so the client falls back to plain HTTP instead of waiting out its handshake timeout.
                writer.write(b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")
                await writer.drain()
            elif first:
                while await self._exchange(reader, writer, first):
                    first = b""
            clean = True
        except _Cut:
            clean = True
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client or upstream went away mid-exchange
        except asyncio.CancelledError:
            pass  # stop(); ending quietly, as asyncio.streams (3.11) mishandles a cancelled handler
        except Exception:
            self.errors.append(traceback.format_exc())
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            await _close(writer, abort=not clean)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        first: bytes = b"") -> bool:
        """Serve one request (``first``: bytes of it already read); returns whether to keep the connection."""
        head = await _read_head(reader, first)
        if head is None:
            return False
        method, target, version, headers = _parse_request(head)
        seen = Seen(method, target, time.monotonic(), range=_get(headers, "range"))
        actions = self._match(method, target)
        seen.faults = tuple(type(a).__name__.lower() for a in actions)
        with self._lock:
            self._seen.append(seen)
        try:
            keep_alive = version == "HTTP/1.1" and not _has_token(headers, "connection", "close")
            expects = _has_token(headers, "expect", "100-continue")
            for a in actions:
                if isinstance(a, Delay):
                    await asyncio.sleep(a.seconds)
            if any(isinstance(a, Hangup) for a in actions):
                raise _Cut
            answer = next((a for a in actions if isinstance(a, Status)), None)
            respond = next((a for a in actions if isinstance(a, Respond)), None)
            if respond is not None:
                answer = await asyncio.get_running_loop().run_in_executor(None, respond.make, method, target)
            if answer is not None:
                if expects:
                    keep_alive = False  # the body was never invited; don't wait for it
                else:
                    async for _ in _raw_body(reader, headers):
                        pass
                await self._answer(writer, seen, answer, method, keep_alive)
                return keep_alive
            if expects:
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                headers = [(k, v) for k, v in headers if k.lower() != "expect"]
            return await self._forward(reader, writer, seen, actions, method, target, headers, keep_alive)
        finally:
            self._update(seen, end=time.monotonic())

    async def _answer(self, writer: asyncio.StreamWriter, seen: Seen, answer: Status, method: str,
                      keep_alive: bool) -> None:
        lines = [f"HTTP/1.1 {answer.code} {_reason(answer.code)}", f"Content-Length: {len(answer.body)}"]
        lines += [f"{k}: {v}" for k, v in answer.headers.items()]
        if not keep_alive:
            lines.append("Connection: close")
        self._update(seen, status=answer.code)  # before the client can see it
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if method != "HEAD":
            writer.write(answer.body)
        await writer.drain()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen,
                       actions: tuple[Action, ...], method: str, target: str, headers: Headers,
                       keep_alive: bool) -> bool:
        host, _, port = self.upstream.rpartition(":")
        try:
            up_r, up_w = await asyncio.open_connection(host, int(port))
        except OSError:
            await self._answer(writer, seen, Status(502, body=b"upstream unreachable"), method, False)
            return False
        self._writers.add(up_w)
        done = False
        try:
            # One upstream connection per request: no stale pooled connections to reason about.
            fwd = [(k, self.upstream if k.lower() == "host" else v) for k, v in headers
                   if k.lower() not in ("connection", "keep-alive", "proxy-connection")]
            up_w.write(_head(f"{method} {target} HTTP/1.1", [*fwd, ("Connection", "close")]))
            async with contextlib.aclosing(_raw_body(reader, headers)) as body:
                async for piece in body:
                    up_w.write(piece)
                    await up_w.drain()
            await up_w.drain()
            while True:
                resp = await _read_head(up_r)
                if resp is None:
                    raise ConnectionResetError("upstream closed before responding")
                status_line, resp_headers = _parse_response(resp)
                code = int(status_line.split(" ")[1])
                if not 100 <= code < 200:
                    break
            framing = _response_framing(method, code, resp_headers)
            out = [(k, self._rewrite(v) if k.lower() == "location" else v) for k, v in resp_headers
                   if k.lower() not in ("connection", "keep-alive")]
            cut = next((a.nbytes for a in actions if isinstance(a, Truncate)), None)
            if cut is not None and framing == "length":
                out = [(k, str(min(cut, int(v))) if k.lower() == "content-length" else v) for k, v in out]
            for a in actions:
                if isinstance(a, AddHeaders):
                    out += list(a.headers)
            if framing == "eof":
                keep_alive = False
            if not keep_alive:
                out.append(("Connection", "close"))
            self._update(seen, status=code)
            writer.write(_head(status_line, out))
            await writer.drain()
            async with contextlib.aclosing(_decoded_body(up_r, resp_headers, framing, cut)) as payload:
                await _send_body(writer, payload, framing == "chunked", actions)
            done = True
            return keep_alive
        finally:
            self._writers.discard(up_w)
            await _close(up_w, abort=not done)

    def _rewrite(self, location: str) -> str:
        prefix = f"http://{self.upstream}"
        return self.url + location[len(prefix):] if location.startswith(prefix) else location


@pytest.fixture
def make_fault_proxy() -> Iterator[Callable[[str], FaultProxy]]:
    """Starts proxies in front of "host:port" upstreams; stops them and checks they had no errors."""
    started: list[FaultProxy] = []

    def make(upstream: str) -> FaultProxy:
        started.append(FaultProxy(upstream).start())
        return started[-1]

    yield make
    for p in started:
        p.stop()
    assert [e for p in started for e in p.errors] == []


# ---- HTTP/1.1 wire helpers -------------------------------------------------------------------

async def _close(w: asyncio.StreamWriter, abort: bool) -> None:
    if abort:
        w.transport.abort()
    else:
        w.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(w.wait_closed(), 5)


async def _read_head(r: asyncio.StreamReader, first: bytes = b"") -> bytes | None:
    """The head up to the blank line, or None on a clean EOF between messages."""
    try:
        data = first + await r.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if (first + e.partial).strip():
            raise
        return None
    return data.lstrip(b"\r\n")


def _parse_headers(lines: list[str]) -> Headers:
    out: Headers = []
    for line in lines:
        if line:
            k, _, v = line.partition(":")
            out.append((k.strip(), v.strip()))
    return out


def _parse_request(head: bytes) -> tuple[str, str, str, Headers]:
    lines = head.decode("latin-1").split("\r\n")
    method, target, version = lines[0].split(" ", 2)
    return method.upper(), target, version, _parse_headers(lines[1:])


def _parse_response(head: bytes) -> tuple[str, Headers]:
    lines = head.decode("latin-1").split("\r\n")
    return lines[0], _parse_headers(lines[1:])


def _get(headers: Headers, name: str) -> str | None:
    return next((v for k, v in headers if k.lower() == name), None)


def _has_token(headers: Headers, name: str, token: str) -> bool:
    return any(k.lower() == name and token in v.lower().replace(" ", "").split(",") for k, v in headers)


def _head(first: str, headers: Headers) -> bytes:
    return (first + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode("latin-1")


def _reason(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Status"


def _response_framing(method: str, code: int, headers: Headers) -> str:
    if method == "HEAD" or code in (204, 304) or 100 <= code < 200:
        return "none"
    if _has_token(headers, "transfer-encoding", "chunked"):
        return "chunked"
    if _get(headers, "content-length") is not None:
        return "length"
    return "eof"


async def _read_some(r: asyncio.StreamReader, n: int) -> bytes:
    data = await r.read(min(n, PIECE))
    if not data:
        raise asyncio.IncompleteReadError(b"", n)
    return data


async def _raw_body(r: asyncio.StreamReader, headers: Headers) -> AsyncGenerator[bytes, None]:
    """A request body as it is on the wire (chunk framing kept), so it can be relayed verbatim."""
    if _has_token(headers, "transfer-encoding", "chunked"):
        while True:
            line = await r.readuntil(b"\r\n")
            yield line
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then the blank line
                    trailer = await r.readuntil(b"\r\n")
                    yield trailer
                    if trailer == b"\r\n":
                        return
            left = size + 2  # data and its CRLF
            while left:
                data = await _read_some(r, left)
                left -= len(data)
                yield data
    else:
        left = int(_get(headers, "content-length") or 0)
        while left:
            data = await _read_some(r, left)
            left -= len(data)
            yield data


async def _decoded_body(r: asyncio.StreamReader, headers: Headers, framing: str,
                        limit: int | None = None) -> AsyncGenerator[bytes, None]:
    """A response body's payload bytes, whatever its framing; only ``limit`` of them if given."""
    if limit is not None:
        async with contextlib.aclosing(_decoded_body(r, headers, framing)) as body:
            async for data in body:
                if limit <= 0:
                    return
                yield data[:limit]
                limit -= len(data)
        return
    if framing == "length":
        left = int(_get(headers, "content-length") or 0)
        while left:
            data = await _read_some(r, left)
            left -= len(data)
            yield data
    elif framing == "chunked":
        while True:
            size = int((await r.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while await r.readuntil(b"\r\n") != b"\r\n":
                    pass
                return
            while size:
                data = await _read_some(r, size)
                size -= len(data)
                yield data
            await r.readexactly(2)
    elif framing == "eof":
        while data := await r.read(PIECE):
            yield data


async def _send_body(w: asyncio.StreamWriter, payload: AsyncGenerator[bytes, None], chunked: bool,
                     actions: tuple[Action, ...]) -> None:
    """Relay the payload applying body faults; raises _Cut when the connection must be closed."""
    drop = next((a.nbytes for a in actions if isinstance(a, DropAfter)), None)
    flips = {a.offset for a in actions if isinstance(a, Corrupt)}
    pause = next((a for a in actions if isinstance(a, Stall)), None)
    rate = next((a.bytes_per_second for a in actions if isinstance(a, Throttle)), None)
    sent = 0
    began = time.monotonic()

    async def emit(piece: bytes) -> None:
        w.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        await w.drain()
        if rate is not None:  # hold the pace: `sent` bytes no sooner than sent / rate seconds in
            await asyncio.sleep(max(0.0, began + (sent + len(piece)) / rate - time.monotonic()))

    async for data in payload:
        while data:
            if pause is not None and sent >= pause.after:
                await asyncio.sleep(pause.seconds)
                pause = None
            if drop is not None and sent >= drop:
                raise _Cut
            # Split pieces at the offsets where a fault starts.
            limit = len(data)
            if pause is not None:
                limit = min(limit, pause.after - sent)
            if drop is not None:
                limit = min(limit, drop - sent)
            piece, data = data[:limit], data[limit:]
            hit = [o - sent for o in flips if sent <= o < sent + len(piece)]
            if hit:
                buf = bytearray(piece)
                for i in hit:
                    buf[i] ^= 0xFF
                piece = bytes(buf)
            await emit(piece)
            sent += len(piece)
    if pause is not None:  # body shorter than `after`: still hold the response open
        await asyncio.sleep(pause.seconds)
    if drop is not None:
        raise _Cut
    if chunked:
        w.write(b"0\r\n\r\n")
        await w.drain()
