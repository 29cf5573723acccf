"""A virtual clock for scale tests: an event loop whose time jumps to the next timer whenever it is idle.

``run_virtual(coro)`` runs ``coro`` on it: every ``asyncio.sleep`` (a fake provider's cold start, its
compute time) takes no real time, and ``loop.time()`` reads the model's seconds, so a 64-worker book that
would take minutes is measured exactly in well under a second, whatever else the machine is doing. Work
handed to threads (``asyncio.to_thread``) is waited for in real time with the clock stopped, so it costs
no model seconds either: what is measured is the schedule, not this machine's speed.
"""

from __future__ import annotations

import asyncio
import selectors
import threading
from collections.abc import Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class _CountingExecutor(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(max_workers=8, thread_name_prefix="virtual-clock")
        self.busy = 0
        self._lock = threading.Lock()

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        with self._lock:
            self.busy += 1
        future = super().submit(fn, *args, **kwargs)
        future.add_done_callback(self._done)
        return future

    def _done(self, _future: Future[Any]) -> None:
        with self._lock:
            self.busy -= 1


class _JumpingSelector(selectors.DefaultSelector):
    """``select(timeout)`` returns at once, moving the loop's clock forward by ``timeout``, when
    nothing is ready and no thread is working for the loop."""

    loop: VirtualClockLoop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None or timeout <= 0 or self.loop.executor.busy:
            return super().select(timeout)
        ready = super().select(0)
        if not ready:
            self.loop.offset += timeout
        return ready


class VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        selector = _JumpingSelector()
        self.offset = 0.0
        super().__init__(selector)
        selector.loop = self
        self.executor = _CountingExecutor()
        self.set_default_executor(self.executor)

    def time(self) -> float:
        return super().time() + self.offset


def run_virtual(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a fresh virtual-clock loop."""
    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


__all__ = ["VirtualClockLoop", "run_virtual"]
