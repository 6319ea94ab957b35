"""A lane: one image's share of the engine's thread pool.

Every image a worker has in flight submits its requests and blob copies to one pool; a lane lets
at most ``limit`` of one image's run at once and queues the rest in order, so a large image cannot
take every thread from the small ones beside it, and a pool sized for all slots stays fair.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from contextvars import Context, copy_context
from functools import partial
from typing import Any, ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")

_Item = tuple[Future[Any], Context, Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class Lane(Executor):
    """Submits to ``pool`` with at most ``limit`` of this lane's calls running at a time.

    Calls run in their submitter's context, whichever thread starts them, so the retries of a copy's
    requests reach the watch it set (``retry.watching``). Shutting a lane down does nothing: the pool
    belongs to the engine."""

    def __init__(self, pool: Executor, limit: int) -> None:
        if limit < 1:
            raise ValueError("a lane needs a limit of at least 1")
        self._pool, self._limit = pool, limit
        self._running = 0
        self._waiting: deque[_Item] = deque()
        self._lock = threading.Lock()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        outer: Future[T] = Future()
        item: _Item = (outer, copy_context(), fn, args, kwargs)
        with self._lock:
            if self._running >= self._limit:
                self._waiting.append(item)
                return outer
            self._running += 1
        self._start(item)
        return outer

    def _start(self, item: _Item | None) -> None:
        # A loop, not recursion: a run of cancelled calls must not deepen the stack.
        while item is not None:
            outer, context, fn, args, kwargs = item
            if outer.set_running_or_notify_cancel():
                try:
                    inner = self._pool.submit(context.run, fn, *args, **kwargs)
                except BaseException as exc:  # the pool is shut down: fail this call, go on
                    outer.set_exception(exc)
                else:
                    inner.add_done_callback(partial(self._finished, outer))
                    return
            item = self._next()

    def _finished(self, outer: Future[Any], inner: Future[Any]) -> None:
        if inner.cancelled():  # the pool shut down before the call ran; ``outer`` is already running
            outer.set_exception(RuntimeError("the engine's pool cancelled this call"))
        elif (exc := inner.exception()) is not None:
            outer.set_exception(exc)
        else:
            outer.set_result(inner.result())
        self._start(self._next())

    def _next(self) -> _Item | None:
        with self._lock:
            if self._waiting:
                return self._waiting.popleft()
            self._running -= 1
            return None
