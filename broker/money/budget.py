"""Budgets: per-job caps and rolling daily/monthly limits, reserved before dispatch and settled after.

An attempt at a provider that can bill reserves ``quote × reserve_factor`` (shrunk to the headroom
left, never below the quote) in the ledger before the provider is called, and records the provider's
job id the moment the provider accepts it (write-ahead); the manager stops the attempt before its running cost
could pass what was reserved, and settles the reservation to the billed cost when it ends. The
check and the reservation are one store transaction (SQLite or PostgreSQL), taken under an asyncio lock in a worker
thread, so concurrent jobs in one process and jobs in other processes sharing the ledger file
never spend past a limit together. ``BudgetExceeded`` is raised before anything is spent; when the
limit is full only of open reservations (they usually settle far below what they hold), the attempt
waits for room until its deadline instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from broker.store.base import BudgetFull, LedgerBusy, LedgerStore, SpendLimit

#: how often a job waiting for budget room looks again (other processes settle without telling us)
ROOM_POLL_S = 0.25

T = TypeVar("T")
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

    def limits(self, job_id: str, max_usd: float | None = None,
               tenant: TenantBudget | None = None) -> list[SpendLimit]:
        out = [] if tenant is None else tenant.limits()
        per_job = min((v for v in (self.max_usd_per_job, max_usd) if v is not None), default=None)
        if per_job is not None:
            out.append(SpendLimit("per-job budget", per_job, job_id=job_id))
        if self.daily_usd is not None:
            out.append(SpendLimit("daily budget (rolling 24 h)", self.daily_usd, window_s=DAY_S))
        if self.monthly_usd is not None:
            out.append(SpendLimit("monthly budget (rolling 30 days)", self.monthly_usd, window_s=MONTH_S))
        return out


@dataclass(frozen=True)
class TenantBudget:
    """Whose job it is (a gateway API key's tenant), and that tenant's own rolling budgets.

    Its attempts carry the tenant in the ledger, and its limits are checked in the same transaction as the
    manager's own: a tenant never spends past its cap, on any replica, and never past the fleet's either."""

    tenant: str
    daily_usd: float | None = None
    monthly_usd: float | None = None

    @property
    def active(self) -> bool:
        return self.daily_usd is not None or self.monthly_usd is not None

    def limits(self) -> list[SpendLimit]:
        out = []
        if self.daily_usd is not None:
            out.append(SpendLimit(f"tenant {self.tenant}'s daily budget (rolling 24 h)", self.daily_usd,
                                  window_s=DAY_S, tenant=self.tenant))
        if self.monthly_usd is not None:
            out.append(SpendLimit(f"tenant {self.tenant}'s monthly budget (rolling 30 days)", self.monthly_usd,
                                  window_s=MONTH_S, tenant=self.tenant))
        return out


@dataclass
class Reservation:
    #: the ledger row; None until settled when no budget needed the attempt written up front
    attempt_id: int | None
    usd: float
    #: True when a budget limit bounds this attempt (its running time is then capped by ``usd``)
    capped: bool
    pending: dict[str, Any] = field(default_factory=dict)
    #: the provider can bill: its row is written the moment it accepts the job
    write_ahead: bool = False


class Accountant:
    """Opens and settles ledger attempts, enforcing the budget on the way in."""

    def __init__(self, ledger: LedgerStore, budget: Budget | None = None) -> None:
        self.ledger = ledger
        self.budget = budget or Budget()
        self._lock = asyncio.Lock()
        self._settled: asyncio.Event | None = None

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
        billable: bool = True,
        wait_until: float | None = None,
        tenant: TenantBudget | None = None,
    ) -> Reservation:
        """Reserve for one attempt. ``billable=False`` (a free provider) writes the row once, when it ends;
        ``wait_until`` (a ``time.monotonic()`` instant) lets a full budget wait for open reservations to settle;
        ``tenant``: whose job it is (its row says so) and that tenant's budgets, checked with the rest."""
        limits = self.budget.limits(job_id, max_usd, tenant) if quote_usd > 0 or max_usd is not None else []
        who = None if tenant is None else tenant.tenant
        if not limits:
            # Nothing to enforce: a provider that can bill gets its row once it accepts the job (``started``,
            # before anyone waits on it); one that cannot is written once, when it ends.
            return Reservation(None, quote_usd, capped=False, write_ahead=billable, pending={
                "job_id": job_id, "provider": provider, "hardware": hardware, "task": task, "hedge": hedge,
                "reserved_usd": quote_usd, "started_at": time.time(), "tenant": who})
        while True:
            reserving = asyncio.ensure_future(
                self._reserve(job_id, provider, limits, quote_usd, hardware, task, expires_at, hedge, who))
            try:
                return await asyncio.shield(reserving)
            except asyncio.CancelledError:
                # the row may already be written (in a thread): release it now rather than at its expiry
                await asyncio.wait([reserving])
                if not reserving.cancelled() and reserving.exception() is None:
                    self.settle(reserving.result(), "cancelled")
                raise
            except BudgetFull as exc:
                if not exc.waitable or wait_until is None or time.monotonic() + ROOM_POLL_S >= wait_until:
                    raise
            await self._room(min(ROOM_POLL_S, wait_until - time.monotonic()))

    async def _room(self, timeout: float) -> None:
        """Wait until an attempt of ours settles, or ``timeout`` (another process's may have)."""
        if self._settled is None:
            self._settled = asyncio.Event()
        event = self._settled
        try:
            await asyncio.wait_for(event.wait(), max(0.0, timeout))
        except TimeoutError:
            pass
        if event.is_set():
            self._settled = None

    async def _reserve(self, job_id: str, provider: str, limits: list[SpendLimit], quote_usd: float,
                       hardware: str | None, task: str | None, expires_at: float | None,
                       hedge: bool, tenant: str | None) -> Reservation:
        wanted = quote_usd * self.budget.reserve_factor
        kwargs = dict(hardware=hardware, task=task, reserved_usd=wanted, min_reserved_usd=quote_usd,
                      expires_at=expires_at, hedge=hedge, limits=limits, tenant=tenant)
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
                limits=limits, now=time.time(), tenant=tenant,
            )
        return Reservation(aid, usd, capped=True)

    async def started(self, reservation: Reservation, provider_job_id: str) -> None:
        """The provider accepted the job: its id goes to the ledger before we wait on it.

        Cancellation-safe: a write that went to a thread finishes, and its row id is kept, before a
        cancellation (a hedge that lost, Ctrl-C) reaches the caller — else the attempt would be settled as
        a second row while the first stayed open."""
        write = asyncio.ensure_future(self._started(reservation, provider_job_id))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            await asyncio.wait([write])
            raise

    async def _started(self, reservation: Reservation, provider_job_id: str) -> None:
        if reservation.attempt_id is not None:
            await _off_the_loop_if_busy(self.ledger.started, reservation.attempt_id, provider_job_id)
        elif reservation.write_ahead:
            p = reservation.pending
            reservation.attempt_id, _ = await _off_the_loop_if_busy(
                self.ledger.open_attempt, p["job_id"], p["provider"], hardware=p["hardware"], task=p["task"],
                reserved_usd=p["reserved_usd"], hedge=p["hedge"], now=p["started_at"],
                provider_job_id=provider_job_id, tenant=p["tenant"])

    def cancelling(self, reservation: Reservation, *, provider_job_id: str | None, expires_at: float | None,
                   message: str | None = None) -> None:
        """The job was abandoned and its cancel is not confirmed yet: the row stays open, reservation held."""
        if reservation.attempt_id is None:
            p = reservation.pending
            reservation.attempt_id, _ = self.ledger.open_attempt(
                p["job_id"], p["provider"], hardware=p["hardware"], task=p["task"], reserved_usd=p["reserved_usd"],
                hedge=p["hedge"], now=p["started_at"], tenant=p["tenant"])
        self.ledger.mark_cancelling(reservation.attempt_id, provider_job_id=provider_job_id, expires_at=expires_at,
                                    message=message)

    def settle(self, reservation: Reservation, status: str, **fields: Any) -> None:
        """Close the attempt with what it really cost."""
        if reservation.attempt_id is None:
            self.ledger.record_attempt(status=status, **reservation.pending, **fields)
        else:
            self.ledger.close_attempt(reservation.attempt_id, status, **fields)
        if self._settled is not None:
            self._settled.set()


async def _off_the_loop_if_busy(write: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Write right here when the ledger is free; if another process holds its write lock, wait for it in a
    worker thread (busy_timeout) rather than on the event loop."""
    if getattr(getattr(write, "__self__", None), "remote", False):
        return await asyncio.to_thread(write, *args, **kwargs)  # a network round trip: never on the loop
    try:
        return write(*args, wait=False, **kwargs)
    except LedgerBusy:
        return await asyncio.to_thread(write, *args, **kwargs)
