"""Real helper processes for tests: free ports, waiting, clean shutdown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(pred: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll ``pred`` until it is true; on timeout say what was awaited and how it last failed."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if pred():
                return
            last = None
        except Exception as e:  # not ready yet (a server still starting, a key not written)
            last = e
        time.sleep(0.05)
    why = f"; last attempt raised {type(last).__name__}: {last}" if last is not None else ""
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}{why}") from last


def holds_for(pred: Callable[[], bool], seconds: float, what: str = "condition") -> None:
    """Assert ``pred`` stays true for ``seconds``, checked throughout (a thing that must not happen)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert pred(), f"{what} stopped holding"
        time.sleep(0.05)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Stop a process started with start_new_session=True, and its children."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
