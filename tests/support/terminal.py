"""Run a command in a pseudo-terminal of a fixed size and read back what a person would see."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
import time
from dataclasses import dataclass, field

from tests.support.workers import ROOT

COLUMNS, ROWS = 120, 35
# CSI sequences (cursor moves, colours, erase line) and the few single-character controls rich uses.
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\x1b[=>78]")


def plain(text: str) -> str:
    return _ESCAPES.sub("", text)


@dataclass
class Terminal:
    """A process whose stdout and stderr are one pty; every chunk it writes is kept with the time
    it arrived, so a test can ask when a line first appeared."""

    proc: subprocess.Popen[bytes]
    master: int
    chunks: list[tuple[float, str]] = field(default_factory=list)
    _reader: threading.Thread | None = None

    @classmethod
    def run(cls, args: list[str], env: dict[str, str], columns: int = COLUMNS, rows: int = ROWS) -> Terminal:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        env = {k: v for k, v in env.items() if k not in ("COLUMNS", "LINES", "NO_COLOR", "TERM")}
        env["TERM"] = "xterm-256color"
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdin=slave, stdout=slave,
                                stderr=slave, start_new_session=True)
        os.close(slave)
        term = cls(proc, master)
        term._reader = threading.Thread(target=term._read, daemon=True)
        term._reader.start()
        return term

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the other side closed
                break
            if not data:
                break
            self.chunks.append((time.monotonic(), data.decode(errors="replace")))

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"still running after {timeout}s:\n{self.text}") from None
        if self._reader is not None:
            self._reader.join(10)
            self._reader = None
            os.close(self.master)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    @property
    def raw(self) -> str:
        return "".join(c for _, c in list(self.chunks))

    @property
    def text(self) -> str:
        """Everything written, escape sequences removed, one line per line or redraw."""
        return "\n".join(line.rstrip() for line in re.split(r"\r\n|\r|\n", plain(self.raw)))

    def lines(self) -> list[str]:
        return [line for line in self.text.split("\n") if line.strip()]

    def first_seen(self, pattern: str) -> float | None:
        """When the output first contained ``pattern`` (a regex over the plain text)."""
        seen = ""
        for at, chunk in list(self.chunks):
            seen += chunk
            if re.search(pattern, plain(seen)):
                return at
        return None
