"""Exponential backoff with full jitter for temporary registry errors.

The transport layer owns retries: it wraps each request or blob transfer once;
nothing beneath it (httpx has ``retries=0``) and nothing above it retries again.
Whoever runs a copy may watch its retries (``watching``), so a person sees a registry being
retried while it happens rather than a stalled bar.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from config import defaults
from workers.engine.errors import RateLimited, RegistryError
from workers.engine.protocols import NoObserver, Observer

T = TypeVar("T")
log = logging.getLogger(__name__)

# A registry asking for a longer pause than this is waited out by the task layer instead.
RETRY_AFTER_CAP = 60.0


class RetryWatch(Protocol):
    """Told of each pause before a request is sent again, and when a retried request succeeds."""

    def retrying(self, what: str, failure: int, attempts: int, pause: float, error: RegistryError) -> None: ...

    def recovered(self, what: str) -> None: ...


# Set per copy, in the thread that runs it; the engine's lanes carry it into its pool's threads.
_watch: ContextVar[RetryWatch | None] = ContextVar("ferry_retry_watch", default=None)


@contextmanager
def watching(watch: RetryWatch) -> Iterator[None]:
    """Report the retries of every request made in this context to ``watch``."""
    token = _watch.set(watch)
    try:
        yield
    finally:
        _watch.reset(token)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = defaults.RETRY_ATTEMPTS
    base_delay: float = defaults.RETRY_BASE_DELAY
    max_delay: float = defaults.RETRY_MAX_DELAY
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False, repr=False)
    rand: Callable[[], float] = field(default=random.random, compare=False, repr=False)
    observer: Observer = field(default_factory=NoObserver, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("delays must not be negative")

    def delay(self, failures: int, error: BaseException | None = None) -> float:
        """Seconds to wait after the ``failures``-th failure (1-based)."""
        if isinstance(error, RateLimited) and error.retry_after is not None:
            return min(error.retry_after, max(self.max_delay, RETRY_AFTER_CAP))
        ceiling = min(self.max_delay, self.base_delay * 2.0 ** (failures - 1))
        return ceiling * self.rand()

    def should_retry(self, error: BaseException, failures: int) -> bool:
        return isinstance(error, RegistryError) and error.temporary and failures < self.attempts

    def call(self, fn: Callable[[], T], *, what: str = "request") -> T:
        """``fn()``, again after a pause for each temporary failure, up to ``attempts`` calls."""
        failures = 0
        while True:
            try:
                value = fn()
            except RegistryError as exc:
                failures += 1
                if not self.should_retry(exc, failures):
                    raise
                pause = self.delay(failures, exc)
                log.info("%s failed (%s); retry %d/%d in %.1fs", what, exc, failures,
                         self.attempts - 1, pause)
                self.observer.retry()
                if (watch := _watch.get()) is not None:
                    watch.retrying(what, failures, self.attempts, pause, exc)
                self.sleep(pause)
                continue
            if failures and (watch := _watch.get()) is not None:
                watch.recovered(what)
            return value
