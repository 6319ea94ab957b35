"""A TCP proxy that puts a wide-area link's delay between its clients and a server.

Every byte is held ``--delay-ms`` before it is passed on, in both directions, and a new connection
waits one round trip before its first byte (the handshake), so a request costs what it would across
a continent. It runs as its own process so it can live in another network namespace:

    python -m tests.support.delayproxy --listen 10.213.7.2:5000 --upstream 10.213.7.2:5001 --delay-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time


async def _carry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy ``reader`` to ``writer``, each piece ``delay`` seconds after it arrived (order kept)."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()

    sender = asyncio.create_task(deliver())
    try:
        while data := await reader.read(64 * 1024):
            queue.put_nowait((time.monotonic() + delay, data))
    except OSError:
        pass
    queue.put_nowait((0.0, b""))
    with contextlib.suppress(OSError):
        await sender


async def _connection(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, upstream: tuple[str, int],
                      delay: float) -> None:
    try:
        server_r, server_w = await asyncio.open_connection(*upstream)
    except OSError:
        client_w.close()
        return
    await asyncio.sleep(2 * delay)
    try:
        await asyncio.gather(_carry(client_r, server_w, delay), _carry(server_r, client_w, delay))
    finally:
        for w in (client_w, server_w):
            w.close()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def _serve(listen: tuple[str, int], upstream: tuple[str, int], delay: float) -> None:
    server = await asyncio.start_server(lambda r, w: _connection(r, w, upstream, delay), *listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--listen", required=True, help="host:port to accept on")
    p.add_argument("--upstream", required=True, help="host:port to forward to")
    p.add_argument("--delay-ms", type=float, default=20.0, help="one-way delay")
    a = p.parse_args()
    asyncio.run(_serve(_address(a.listen), _address(a.upstream), a.delay_ms / 1000))


if __name__ == "__main__":
    main()
