"""The storage interface: what the ledger, budgets, the journal and reconciliation ask of a store.

Two backends implement it: SQLite (``broker.money.ledger.Ledger``, the embedded default, exact across
the processes of one machine) and PostgreSQL (``broker.store.postgres.PostgresLedger``, exact across
machines). Callers — the manager, the accountant, the CLI — see only these methods; no SQL dialect
leaks out of a backend. Times are Unix seconds (``time.time()``) everywhere, money is US dollars.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from broker.errors import BudgetExceeded

#: attempt statuses that still hold a reservation: not yet started, waiting on the provider, or abandoned
#: with its cancel not yet confirmed
OPEN_STATUSES = ("reserved", "running", "cancelling")


class LedgerBusy(Exception):
    """Another process holds the budget lock right now (raised only when asked not to wait)."""


class BudgetFull(BudgetExceeded):
    """A limit has no room for this attempt. ``waitable``: settled spend alone leaves room, so the
    attempt fits once open reservations settle (the caller may wait for that, within its deadline)."""

    def __init__(self, waitable: bool, message: str) -> None:
        super().__init__(message)
        self.waitable = waitable


@dataclass(frozen=True)
class SpendLimit:
    """A cap on spend: over a rolling window (``window_s``; None: ever), for one job (``job_id``), or for one
    tenant's attempts over the window (``tenant``: a gateway API key's daily or monthly budget)."""

    label: str
    cap_usd: float
    window_s: float | None = None
    job_id: str | None = None
    tenant: str | None = None


@runtime_checkable
class LedgerStore(Protocol):
    """Every attempt at every endpoint: reserved before dispatch, settled after, summed for budgets."""

    #: a reservation is a network round trip (PostgreSQL): callers on an event loop run it in a thread
    #: rather than block the loop; False for an embedded store whose calls take microseconds
    remote: bool

    def open_attempt(self, job_id: str, provider: str, *, hardware: str | None = None, task: str | None = None,
                     reserved_usd: float = 0.0, min_reserved_usd: float | None = None,
                     expires_at: float | None = None, hedge: bool = False, limits: Sequence[SpendLimit] = (),
                     now: float | None = None, wait: bool = True,
                     provider_job_id: str | None = None, tenant: str | None = None) -> tuple[int, float]:
        """Check ``limits`` and write the reservation in one transaction; (attempt id, dollars reserved).
        ``tenant``: whose attempt it is (tenant-scoped limits count it).

        Raises ``BudgetExceeded`` (nothing written) when even ``min_reserved_usd`` does not fit, and
        ``LedgerBusy`` with ``wait=False`` when another writer holds the lock."""
        ...

    def record_attempt(self, job_id: str, provider: str, status: str, *, hardware: str | None = None,
                       task: str | None = None, hedge: bool = False, reserved_usd: float = 0.0, started_at: float,
                       provider_job_id: str | None = None, billed_seconds: float | None = None,
                       cost_usd: float = 0.0, cost_estimated: bool = True, error_class: str | None = None,
                       message: str | None = None, ended_at: float | None = None, unpriced: bool = False,
                       tenant: str | None = None) -> None:
        """Write a finished attempt in one go (nothing could bill: no reservation was needed)."""
        ...

    def close_attempt(self, attempt_id: int, status: str, *, provider_job_id: str | None = None,
                      billed_seconds: float | None = None, cost_usd: float = 0.0, cost_estimated: bool = True,
                      error_class: str | None = None, message: str | None = None,
                      ended_at: float | None = None, unpriced: bool = False) -> None:
        """Settle a reserved attempt with its outcome and what it really cost (``unpriced``: no price row).

        Only a row this store still owns changes: one another process claimed (``claim``) is settled by it."""
        ...

    def started(self, attempt_id: int, provider_job_id: str, *, wait: bool = True) -> None:
        """Write-ahead: the provider accepted the job; its id is stored before anyone waits on it."""
        ...

    def mark_cancelling(self, attempt_id: int, *, provider_job_id: str | None, expires_at: float | None,
                        message: str | None = None) -> None:
        """Abandoned, cancel unconfirmed: the row stays open and keeps its reservation."""
        ...

    def orphans(self, *, stale_s: float, alive: Callable[[int], bool], now: float | None = None
                ) -> list[dict[str, Any]]:
        """Open attempts whose owner is gone: a dead pid on this host, or no heartbeat for ``stale_s``."""
        ...

    def claim(self, row: dict[str, Any]) -> bool:
        """Take over an orphaned open attempt; False if another process claimed it first."""
        ...

    def heartbeat(self, now: float | None = None) -> int:
        """Tell other processes this one still owns its open attempts; returns how many."""
        ...

    def flush(self) -> None: ...

    def spent(self, *, window_s: float | None = None, job_id: str | None = None,
              now: float | None = None, tenant: str | None = None) -> float: ...

    def total(self) -> float: ...

    def attempts(self, *, job_id: str | None = None, provider: str | None = None, since: float | None = None,
                 limit: int | None = None, tenant: str | None = None) -> list[dict[str, Any]]: ...

    def summary(self, *, since: float | None = None) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class HealthEvent:
    """What one process tells the others about an endpoint (times are Unix seconds).

    ``opened``: the circuit opened until ``until`` (``ejections`` so far); ``closed``: a trial
    succeeded; ``cooldown``: the endpoint asked (429 Retry-After) not to be called before ``until``."""

    kind: str
    endpoint: str
    until: float | None = None
    ejections: int = 0
    origin: str = ""


class SharedHealth(Protocol):
    """Circuit state and rate-limit cooldowns shared by every process on one store."""

    def publish(self, event: HealthEvent) -> None:
        """Tell every other process (and record it as the current state)."""
        ...

    def grant_trial(self, endpoint: str, lease_s: float) -> bool:
        """Take the fleet-wide half-open trial of ``endpoint`` for up to ``lease_s``; False if another has it."""
        ...

    def release_trial(self, endpoint: str) -> None: ...

    def current(self) -> list[HealthEvent]:
        """The fleet's state now: an ``opened`` event per circuit ever opened (``until`` in the past:
        half-open), a ``cooldown`` per endpoint still cooling."""
        ...

    def subscribe(self, deliver: Callable[[HealthEvent], None]) -> None:
        """Call ``deliver`` (from any thread) with the current state, then with every other process's event."""
        ...

    def close(self) -> None: ...
