"""Budgets: per-job caps and rolling daily/monthly limits, reserved before dispatch and settled after.

An attempt reserves ``quote × reserve_factor`` (shrunk to the headroom left, never below the quote)
in the ledger before the provider is called; the manager stops the attempt before its running cost
could pass what was reserved, and settles the reservation to the billed cost when it ends. The
check and the reservation are one store transaction (SQLite or PostgreSQL), taken under an asyncio lock in a worker
thread, so concurrent jobs in one process and jobs in other processes sharing the ledger file
never spend past a limit together. ``BudgetExceeded`` is raised before anything is spent.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from broker.store.base import LedgerBusy, LedgerStore, SpendLimit

DAY_S = 24 * 3600.0
MONTH_S = 30 * DAY_S


@dataclass(frozen=True)
class Budget:
    max_usd_per_job: float | None = None
    daily_usd: float | None = None
    monthly_usd: float | None = None
    #: headroom reserved over the quote, so a slower-than-quoted job is not cut off early
    reserve_factor: float = 2.0

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.max_usd_per_job, self.daily_usd, self.monthly_usd))

    def limits(self, job_id: str, max_usd: float | None = None) -> list[SpendLimit]:
        out = []
        per_job = min((v for v in (self.max_usd_per_job, max_usd) if v is not None), default=None)
        if per_job is not None:
            out.append(SpendLimit("per-job budget", per_job, job_id=job_id))
        if self.daily_usd is not None:
            out.append(SpendLimit("daily budget (rolling 24 h)", self.daily_usd, window_s=DAY_S))
        if self.monthly_usd is not None:
            out.append(SpendLimit("monthly budget (rolling 30 days)", self.monthly_usd, window_s=MONTH_S))
        return out


@dataclass
class Reservation:
    #: the ledger row; None until settled when no budget needed the attempt written up front
    attempt_id: int | None
    usd: float
    #: True when a budget limit bounds this attempt (its running time is then capped by ``usd``)
    capped: bool
    pending: dict[str, Any] = field(default_factory=dict)


class Accountant:
    """Opens and settles ledger attempts, enforcing the budget on the way in."""

    def __init__(self, ledger: LedgerStore, budget: Budget | None = None) -> None:
        self.ledger = ledger
        self.budget = budget or Budget()
        self._lock = asyncio.Lock()

    async def open(
        self,
        job_id: str,
        provider: str,
        *,
        quote_usd: float,
        hardware: str | None = None,
        task: str | None = None,
        expires_at: float | None = None,
        hedge: bool = False,
        max_usd: float | None = None,
    ) -> Reservation:
        limits = self.budget.limits(job_id, max_usd) if quote_usd > 0 or max_usd is not None else []
        if not limits:
            # Nothing to enforce: the attempt is written once, when it ends (one write, not two).
            return Reservation(None, quote_usd, capped=False, pending={
                "job_id": job_id, "provider": provider, "hardware": hardware, "task": task, "hedge": hedge,
                "reserved_usd": quote_usd, "started_at": time.time()})
        wanted = quote_usd * self.budget.reserve_factor
        kwargs = dict(hardware=hardware, task=task, reserved_usd=wanted, min_reserved_usd=quote_usd,
                      expires_at=expires_at, hedge=hedge, limits=limits)
        if not self.ledger.remote and not self._lock.locked():
            # Usually nobody else is writing: reserve right here, without a thread hop (never for a
            # remote store: its round trip would stall every other job on the loop).
            try:
                aid, usd = self.ledger.open_attempt(job_id, provider, now=time.time(), wait=False,
                                                    **kwargs)  # type: ignore[arg-type]
                return Reservation(aid, usd, capped=True)
            except LedgerBusy:
                pass
        async with self._lock:
            # A worker thread: another process may hold the write lock for a moment (busy_timeout).
            aid, usd = await asyncio.to_thread(
                self.ledger.open_attempt, job_id, provider, hardware=hardware, task=task,
                reserved_usd=wanted, min_reserved_usd=quote_usd, expires_at=expires_at, hedge=hedge,
                limits=limits, now=time.time(),
            )
        return Reservation(aid, usd, capped=True)

    def settle(self, reservation: Reservation, status: str, **fields: Any) -> None:
        """Close the attempt with what it really cost."""
        if reservation.attempt_id is None:
            self.ledger.record_attempt(status=status, **reservation.pending, **fields)
        else:
            self.ledger.close_attempt(reservation.attempt_id, status, **fields)
