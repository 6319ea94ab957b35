"""One background thread per process that keeps leases and request slots alive.

Whatever is registered is renewed every ``interval`` seconds until removed; a process
that dies stops renewing, so its leases and slots expire by themselves.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Renewer:
    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._jobs: dict[int, Callable[[], None]] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, renew: Callable[[], None]) -> int:
        with self._lock:
            handle = next(self._ids)
            self._jobs[handle] = renew
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="ferry-renewer", daemon=True)
                self._thread.start()
            return handle

    def remove(self, handle: int) -> None:
        with self._lock:
            self._jobs.pop(handle, None)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                jobs = list(self._jobs.values())
            for renew in jobs:
                try:
                    renew()
                except Exception as exc:  # Redis away for a moment: the next round tries again
                    log.warning("renewal failed: %s", exc)

    def close(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(5)
