"""One background event loop that runs the async core for synchronous callers.

A single long-lived loop (rather than ``asyncio.run`` per call) keeps connection
pools and clients bound to one loop, and works even when the caller is itself
inside a running loop (a notebook, a sync function called from async code).
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_loop: asyncio.AbstractEventLoop | None = None
_lock = threading.Lock()


def _background_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="broker-loop", daemon=True)
            thread.start()
            _loop = loop
            atexit.register(_shutdown)
        return _loop


def _shutdown() -> None:
    if _loop is not None and not _loop.is_closed():
        _loop.call_soon_threadsafe(_loop.stop)


#: how long Ctrl-C (or SIGTERM) waits for the cancelled work to unwind: cancel its provider jobs, settle
#: the ledger. A second interrupt stops waiting.
UNWIND_S = 30.0


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the background loop and wait for it; Ctrl-C cancels it there and waits for it to unwind."""
    loop = _background_loop()
    started, unwound = threading.Event(), threading.Event()

    async def tracked() -> T:
        started.set()
        try:
            return await coro
        finally:
            unwound.set()

    future = asyncio.run_coroutine_threadsafe(tracked(), loop)
    try:
        return future.result()
    except KeyboardInterrupt:
        future.cancel()
        # The cancelled coroutine is still cancelling its provider jobs on the loop: exiting now would
        # leave them running remotely (and billing) with nobody to stop them.
        if started.is_set():
            unwound.wait(UNWIND_S)
        raise


def iterate_sync(agen: AsyncIterator[T]) -> Iterator[T]:
    """Drive an async iterator from synchronous code, one item at a time.

    Ctrl-C (or SIGTERM) while an item is awaited cancels that step on the loop and waits for it to unwind,
    then closes the iterator: its provider job is cancelled before the process goes on to exit.
    """
    loop = _background_loop()
    sentinel = object()
    unwound = threading.Event()

    async def _next() -> Any:
        unwound.clear()
        try:
            return await agen.__anext__()
        except StopAsyncIteration:
            return sentinel
        finally:
            unwound.set()

    interrupted = False
    try:
        while True:
            step = asyncio.run_coroutine_threadsafe(_next(), loop)
            try:
                item = step.result()
            except KeyboardInterrupt:
                interrupted = True
                step.cancel()
                unwound.wait(UNWIND_S)
                raise
            if item is sentinel:
                return
            yield item
    finally:
        aclose = getattr(agen, "aclose", None)
        if aclose is not None:
            closing = asyncio.run_coroutine_threadsafe(aclose(), loop)
            try:
                closing.result(UNWIND_S if interrupted else None)
            except (RuntimeError, TimeoutError):
                if not interrupted:
                    raise
