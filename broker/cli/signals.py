"""SIGTERM is Ctrl-C for commands that run provider jobs (`speak`, `render`, `bench`).

A container runtime, systemd or CI stops a process with SIGTERM. Unhandled, it kills the process on
the spot: remote jobs keep running (and billing) with nobody to cancel them, and the ledger may miss
rows still held in memory. Raised as a ``KeyboardInterrupt`` instead, it takes the same road as
Ctrl-C: the running job is cancelled at its provider, the ledger is flushed, temporary files are
removed, and the process exits 143 (128 + SIGTERM).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TypeVar

T = TypeVar("T")

EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """The process got SIGTERM: stop like Ctrl-C, exit 143."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block, SIGTERM raises ``Terminated`` in the main thread (where signals arrive)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_job_command(fn: Callable[[], T], *, as_json: bool = False) -> T:
    """``guarded(fn)`` with SIGTERM handled like Ctrl-C: what `speak`, `render` and `bench` run."""
    from broker.cli.common import guarded

    with sigterm_as_interrupt():
        return guarded(fn, as_json=as_json)
