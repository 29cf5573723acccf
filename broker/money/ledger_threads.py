"""The ledger's background threads: write-behind flushing, owner heartbeats, the flush at exit.

No SQL here: each thread calls the ``Ledger``'s own methods. Threads hold their ledger weakly and
end when it is closed or collected.
"""

from __future__ import annotations

import atexit
import sqlite3
import threading
import time
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.money.ledger import Ledger

#: seconds between heartbeats of a process's open attempts
HEARTBEAT_S = 15.0


def flusher(ref: weakref.ref[Ledger], wake: threading.Event, delay: float) -> None:
    """One thread per ledger: when woken, wait ``delay`` for more attempts, then write them together.

    It holds the ledger only weakly and ends when the ledger is closed or collected."""
    while True:
        if not wake.wait(timeout=5.0):
            if ref() is None:
                return
            continue
        time.sleep(delay)
        wake.clear()
        ledger = ref()
        if ledger is None or ledger._closed:
            return
        try:
            ledger.flush()
        except sqlite3.Error:
            pass  # a reader or the next reservation will try again
        del ledger


def beat(ref: weakref.ref[Ledger], stop: threading.Event) -> None:
    """Every ``HEARTBEAT_S``: refresh this process's open attempts, so no one reconciles them under us."""
    while not stop.wait(HEARTBEAT_S):
        ledger = ref()
        if ledger is None:
            return
        try:
            ledger.heartbeat()
        except sqlite3.Error:
            pass  # busy or closed: the next beat tries again
        del ledger


LIVE: weakref.WeakSet[Ledger] = weakref.WeakSet()


@atexit.register
def flush_all() -> None:
    """Write what every open ledger still holds in memory (also run when the interpreter exits)."""
    for ledger in list(LIVE):
        try:
            ledger.flush()
        except sqlite3.Error:
            pass
