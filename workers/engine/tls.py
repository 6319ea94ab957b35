"""One TLS client context per process.

Building a context loads the CA bundle (tens of milliseconds of CPU); every registry
client, token client and worker process would otherwise pay it again.
"""

from __future__ import annotations

import ssl
import threading

import httpx

_lock = threading.Lock()
_context: ssl.SSLContext | None = None


def client_context() -> ssl.SSLContext:
    """A verifying context (system CAs, hostname checks) shared by all clients of this process."""
    global _context
    with _lock:
        if _context is None:
            _context = httpx.create_ssl_context(verify=True)
        return _context
