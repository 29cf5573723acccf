"""What abandoned jobs leave behind, finished: cancels the provider refused, and the attempts of dead processes.

Two kinds of leftovers hold money in the ledger:

- a job we abandoned whose cancel the provider has not confirmed (429, 5xx, timeout): its row stays
  ``cancelling``, reservation held, and ``Reconciler.adopt`` keeps asking in the background until the
  provider confirms a terminal state or the job's ttl passes, then settles the row from the provider's bill;
- the open rows of a process that died (kill -9, OOM, a lost host): ``Reconciler.reconcile`` finds them by
  owner (a dead pid on this host, or a heartbeat older than ``stale_s``), claims them, asks the provider
  for each job's status, cancels what still runs, and settles the row — releasing its reservation at once.

A row whose job never reached the provider (the owner died before the provider returned an id) is
closed ``lost`` at $0: there is nothing to look up. A provider this process has not configured is left
alone (its reservation lapses at ``expires_at``), and ``broker reconcile`` says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.money.budget import Accountant, Reservation
from broker.money.pricing import Catalog
from broker.providers.base import Job, JobState, Provider

log = logging.getLogger("broker.routing.reconcile")

#: a process whose heartbeat is older than this counts as dead (its host may be another machine)
STALE_S = 120.0
#: how long reconcile keeps asking one provider to cancel before leaving the row ``cancelling`` for later
RECONCILE_PATIENCE_S = 20.0
#: pause between two rounds of cancel requests for an adopted job (each round honours Retry-After itself)
ADOPT_PAUSE_S = 1.0


@dataclass(frozen=True)
class Bill:
    """What one provider job cost, priced by the catalog from what the provider reported."""

    billed_seconds: float | None
    cost_usd: float
    estimated: bool
    #: the hardware has no price row: ``cost_usd`` is what the provider stated (often 0), not a price
    unpriced: bool = False

    def fields(self) -> dict[str, Any]:
        return {"billed_seconds": self.billed_seconds, "cost_usd": self.cost_usd,
                "cost_estimated": self.estimated, "unpriced": self.unpriced}


def bill_of(catalog: Catalog, provider: Provider, job: Job | None) -> Bill:
    """The provider's reported seconds priced by the catalog; without a report, the seconds it ran."""
    if job is None:
        return Bill(None, 0.0, True)
    hw = provider.capabilities.hardware
    b = job.billing
    if b is not None:
        seconds, cost = catalog.settle(provider.kind, hw, b)
        return Bill(seconds, cost or 0.0, b.estimated, unpriced=cost is None)
    ran = job.seconds_in(JobState.RUNNING)
    if ran is None and "running" in job.timestamps:
        ran = time.time() - job.timestamps["running"]
    if not ran:
        return Bill(0.0, 0.0, True)
    cost = catalog.cost(provider.kind, hw, ran)
    return Bill(ran, cost or 0.0, True, unpriced=cost is None)


def status_of(job: Job) -> str:
    """The ledger status of a job that is over (abandoned ones that finished anyway keep what happened)."""
    return {JobState.SUCCEEDED: "succeeded", JobState.FAILED: "failed", JobState.LOST: "lost"}.get(
        job.state, "cancelled")


def pid_alive(pid: int) -> bool:
    """Is ``pid`` a live process on this host (a zombie is dead)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


@dataclass
class ReconcileReport:
    settled: list[dict[str, Any]] = field(default_factory=list)
    #: still unconfirmed after this round: left ``cancelling``, owned by this process
    cancelling: list[dict[str, Any]] = field(default_factory=list)
    #: (row, why) this process could not handle (provider not configured here)
    skipped: list[tuple[dict[str, Any], str]] = field(default_factory=list)


class Reconciler:
    """Keeps cancelling what was abandoned, and settles the attempts of processes that died."""

    def __init__(self, accountant: Accountant, catalog: Catalog, providers: Callable[[], Sequence[Provider]], *,
                 stale_s: float = STALE_S, patience_s: float = RECONCILE_PATIENCE_S,
                 sweep_every_s: float | None = None) -> None:
        self.accountant = accountant
        self.catalog = catalog
        self._providers = providers
        self.stale_s = stale_s
        self.patience_s = patience_s
        self.sweep_every_s = sweep_every_s
        self._swept_at = 0.0
        self._adopted: set[asyncio.Task[None]] = set()
        self._sweep: asyncio.Task[ReconcileReport] | None = None

    # -- abandoned jobs of this process ----------------------------------------------------------
    def adopt(self, provider: Provider, job: Job, reservation: Reservation, message: str | None = None) -> None:
        """``job`` was abandoned with its cancel unconfirmed: mark its row ``cancelling`` and keep at it."""
        expires = None if job.expires_at is None else job.expires_at + 60.0
        self.accountant.cancelling(reservation, provider_job_id=job.id, expires_at=expires,
                                   message=message or "abandoned; cancel not confirmed yet")
        task = asyncio.get_running_loop().create_task(self._finish(provider, job, reservation))
        self._adopted.add(task)
        task.add_done_callback(self._adopted.discard)

    async def _finish(self, provider: Provider, job: Job, reservation: Reservation) -> None:
        while not await job.cancel():
            await asyncio.sleep(ADOPT_PAUSE_S)
        with contextlib.suppress(Exception):
            await job.poll()  # the final status carries the timings the bill is made of
        bill = bill_of(self.catalog, provider, job)
        self.accountant.settle(reservation, status_of(job), provider_job_id=job.id,
                               message=f"abandoned; {provider.name} confirmed it {job.state.value}", **bill.fields())
        self.accountant.ledger.flush()  # the reservation is released now, not at the next write
        log.info("%s job %s: cancel confirmed (%s), settled at $%.6f", provider.name, job.id, job.state.value,
                 bill.cost_usd)

    @property
    def pending(self) -> int:
        return len(self._adopted)

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait for adopted jobs to be confirmed and settled; True when none is left."""
        tasks = set(self._adopted)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        return not self._adopted

    # -- attempts of processes that died -------------------------------------------------------------
    def kick(self) -> None:
        """Start a background sweep for dead owners' attempts: the first time, then again once the last one
        is over and ``sweep_every_s`` has passed (None: only once), so every live process keeps noticing."""
        sweep = self._sweep
        if sweep is None or (sweep.done() and self.sweep_every_s is not None
                             and time.monotonic() - self._swept_at >= self.sweep_every_s):
            self._swept_at = time.monotonic()
            self._sweep = asyncio.get_running_loop().create_task(self.reconcile())

    async def reconcile(self) -> ReconcileReport:
        """Find, claim and settle the open attempts whose owner died."""
        report = ReconcileReport()
        ledger = self.accountant.ledger
        rows = await asyncio.to_thread(ledger.orphans, stale_s=self.stale_s, alive=pid_alive)
        by_name = {p.name: p for p in self._providers()}
        await asyncio.gather(*(self._one(row, by_name, report) for row in rows))
        return report

    async def _one(self, row: dict[str, Any], by_name: dict[str, Provider], report: ReconcileReport) -> None:
        ledger = self.accountant.ledger
        provider = by_name.get(row["provider"])
        job_id = row["provider_job_id"]
        job = provider.attach(job_id) if provider is not None and job_id else None
        if job_id and job is None:
            why = "provider not configured here" if provider is None else "provider cannot look jobs up by id"
            report.skipped.append((row, why))
            return
        if not ledger.claim(row):
            return  # another process got there first
        reservation = Reservation(int(row["id"]), float(row["reserved_usd"]), capped=True)
        if job is None or provider is None:
            self.accountant.settle(reservation, "lost", message="owner died before the provider returned a job id")
            self.accountant.ledger.flush()
            report.settled.append(row)
            return
        try:
            await job.poll()
        except Exception as exc:  # the status read failed: cancelling settles it either way
            log.info("reconcile: %s job %s: status unknown (%s)", provider.name, job_id, exc)
        confirmed = await job.cancel(patience_s=self.patience_s)
        if not confirmed:
            self.adopt(provider, job, reservation, message="owner died; cancel not confirmed yet")
            report.cancelling.append(row)
            return
        with contextlib.suppress(Exception):
            await job.poll()
        bill = bill_of(self.catalog, provider, job)
        self.accountant.settle(reservation, status_of(job), provider_job_id=job_id,
                               message=f"owner pid {row['owner_pid']} died; reconciled ({job.state.value})",
                               **bill.fields())
        self.accountant.ledger.flush()
        row.update(status=status_of(job), cost_usd=bill.cost_usd)
        report.settled.append(row)


__all__ = ["Bill", "ReconcileReport", "Reconciler", "bill_of", "pid_alive", "status_of"]
