"""One provider's turn at one job: reserve, submit, watch the phases, validate, settle, record.

``ProviderRun.run`` makes the first try and any same-provider retries (tenacity, by error class);
each try is one ``Attempt`` in the job's report and one row in the ledger. A provider that can bill
gets its row before it is called, and the row gets the provider's job id before we wait on the job
(write-ahead). Whatever happens — success, failure, our own cancellation — a provider job that is not
finished is cancelled before the try ends; if the provider will not confirm the cancel yet, the row
stays ``cancelling`` (its reservation held) and the manager's ``Reconciler`` keeps asking. The
breaker, the latency tracker, the ledger and the report all hear about it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator

import numpy as np

from broker.errors import (
    BadOutput,
    BrokerError,
    BudgetExceeded,
    InvalidRequest,
    JobFailed,
    JobLost,
    ProviderTimeout,
    ProviderUnavailable,
)
from broker.media import Audio, AudioChunk, Video
from broker.money.budget import Reservation
from broker.providers.base import Job, JobState, Provider
from broker.routing.context import RoutedJob, Router
from broker.routing.health import Permit
from broker.routing.policy import Candidate
from broker.routing.reconcile import bill_of
from broker.routing.retry import Action, as_broker_error, classify, counts_against_provider, same_provider_retrying
from broker.routing.validate import check_audio, check_output
from broker.types import Attempt

Output = Audio | Video


class CircuitOpen(ProviderUnavailable):
    """The provider's breaker refused the job (someone else holds the half-open trial, or it just opened)."""

    retryable = False


class SinkFailed(Exception):
    """The job's output sink raised. Not a ``BrokerError`` inside routing, so the manager neither retries nor
    fails over (another provider would bill for work that is done); the job ends ``OutputNotKept``."""


class ProviderRun:
    """Every try at one provider for one job."""

    def __init__(self, manager: Router, job: RoutedJob, candidate: Candidate, *, hedge: bool = False):
        self.manager = manager
        self.job = job
        self.provider: Provider = candidate.provider
        self.quote = candidate.quote
        self.hedge = hedge
        self.current: Job | None = None
        self.reserved_usd = 0.0

    @property
    def name(self) -> str:
        return self.provider.name

    def running(self) -> bool:
        """Has the provider started work (for hedging: a running job is not hedged)?"""
        cur = self.current
        return cur is not None and cur.state != JobState.QUEUED

    async def run(self) -> Output:
        # The first try runs outside tenacity (it is the common, successful case and tenacity's
        # bookkeeping costs more than the rest of the manager); a retryable failure is replayed into
        # tenacity as its attempt 1, so the waits and stop rules see it like any other.
        try:
            return await self._try_once()
        except BrokerError as exc:
            if classify(exc) is not Action.RETRY:
                raise
            replay: list[BrokerError] = [exc]
        health = self.manager.health_board[self.name]
        retrying = same_provider_retrying(
            self.manager.retry_rules,
            deadline=self.job.deadline,
            alternatives_left=lambda: self.job.alternatives_left(self.name),
            give_up=lambda: not health.breaker.available(),
        )
        result: Output | None = None
        async for attempt in retrying:
            with attempt:
                if replay:
                    raise replay.pop()
                result = await self._try_once()
        assert result is not None
        return result

    # -- one try ----------------------------------------------------------------------------
    async def _try_once(self) -> Output:
        m, j = self.manager, self.job
        health = m.health_board[self.name]
        permit = health.breaker.acquire()
        if permit is None:
            raise CircuitOpen(f"{self.name}: circuit open", provider=self.name)
        try:
            if permit.trial and m.settings.manager.probe_on_half_open:
                await self._probe(permit)
            reservation = await m.accountant.open(
                j.id, self.name, quote_usd=self.quote.expected_usd, hardware=self.provider.capabilities.hardware,
                task=j.request.task, expires_at=time.time() + j.remaining() + 300.0, hedge=self.hedge,
                max_usd=j.max_usd, billable=self.billable, wait_until=j.deadline, tenant=j.tenant,
            )
        except BudgetExceeded as exc:
            health.breaker.release(permit)
            j.record(Attempt(provider=self.name, outcome="skipped", error_class="BudgetExceeded",
                             message=exc.message, started_at=time.time(), ended_at=time.time()))
            raise
        except BaseException:
            health.breaker.release(permit)
            raise
        self.reserved_usd += reservation.usd
        return await self._dispatch(reservation, permit)

    @property
    def billable(self) -> bool:
        """Can this provider bill for the job (a price above zero, or no price known)?"""
        q = self.quote
        if q.expected_usd > 0 or "unpriced" in q.breakdown:
            return True
        row = self.manager.catalog.price(self.provider.kind, self.provider.capabilities.hardware)
        return row is None or row.usd_per_second > 0

    async def _probe(self, permit: Permit) -> None:
        """Before risking a real job on a half-open provider, ask its own health probe (when it has one)."""
        if type(self.provider).health is Provider.health:
            return
        try:
            async with asyncio.timeout(5.0):
                report = await self.provider.health()
            ok, detail = report.ok, report.detail
        except Exception as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        self.manager.health_board[self.name].probe_detail = detail
        if not ok:
            self.manager.health_board[self.name].breaker.record_failure(permit)
            raise CircuitOpen(f"{self.name}: health probe failed: {detail}", provider=self.name)

    async def _dispatch(self, reservation: Reservation, permit: Permit) -> Output:
        m, j = self.manager, self.job
        started_wall, t0 = time.time(), time.monotonic()
        job: Job | None = None
        try:
            try:
                async with asyncio.timeout(max(0.0, j.deadline - t0)):
                    job = await self.provider.submit(j.request)
            except TimeoutError:
                raise ProviderTimeout(f"{self.name}: submit did not return before the deadline",
                                      provider=self.name) from None
            self.current = job
            await m.accountant.started(reservation, job.id)  # write-ahead: on disk before we wait on it
            out = await self._watch(job, t0, reservation)
            if m.settings.manager.validate_output:
                check_output(j.request, out, provider=self.name)
        except Exception as exc:
            error = as_broker_error(exc, self.name)
            try:
                await self._cancel_if_running(job)
            finally:  # settled and recorded even if a second cancellation cuts the cancel short
                self._close(reservation, job, _outcome_for(error, job), error, started_wall, t0, permit)
            raise error from None
        except BaseException:  # cancelled by the caller, a hedge won, or the interpreter is stopping
            try:
                await self._cancel_if_running(job)
            finally:
                self._close(reservation, job, "cancelled", None, started_wall, t0, permit)
            raise
        await self._succeeded(out, reservation, job, started_wall, t0, permit)
        return out

    async def _succeeded(self, out: Output, reservation: Reservation, job: Job | None, started_wall: float,
                         t0: float, permit: Permit) -> None:
        """Hand the output to the job's sink (when it has one), then settle the attempt as succeeded.

        The sink comes first so that a caller who persists the output there never has an attempt
        settled as billed whose output died with the process. A process that dies after the sink but
        before the settle reaches the ledger leaves the attempt open (its write-ahead row names the
        provider's job) for the reconciler to settle. The attempt is settled as succeeded whatever the
        sink does: the provider finished the job and billed it."""
        sink = self.job.on_output
        try:
            if sink is not None:
                await sink(out)
        except Exception as exc:
            raise SinkFailed(f"{self.name}: the job's output sink failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self._close(reservation, job, "succeeded", None, started_wall, t0, permit)

    async def _watch(self, job: Job, t0: float, reservation: Reservation) -> Output:
        """Wait for ``job`` to finish, cancelling it if it sits queued past the provider's queue timeout,
        runs past the deadline, or would cost more than was reserved for it."""
        m, j = self.manager, self.job
        ms = m.settings.manager
        queue_limit = self.provider.queue_timeout_s or ms.queue_timeout_s
        queue_deadline = t0 + queue_limit
        run_limit = (max(ms.min_run_timeout_s, ms.run_timeout_factor * self.quote.expected_seconds)
                     if ms.run_timeout_factor is not None else float("inf"))
        if not job.state.terminal:
            waiter: asyncio.Task[JobState] = asyncio.ensure_future(job.wait())
            try:
                while not waiter.done():
                    now = time.monotonic()
                    # What was reserved pays for running, not for waiting in a queue (which bills nothing).
                    cost_deadline = (self._running_since(job) + self._affordable_seconds(reservation, job)
                                     if reservation.capped and job.state != JobState.QUEUED else float("inf"))
                    if job.state == JobState.QUEUED:
                        # Look again now and then: the run limit and the cost limit start when the job does.
                        affordable = self._affordable_seconds(reservation, job) if reservation.capped else run_limit
                        next_check = min(j.deadline, queue_deadline,
                                         now + max(0.05, min(run_limit, queue_limit, affordable) / 4))
                    else:
                        next_check = min(j.deadline, cost_deadline, self._running_since(job) + run_limit)
                    await asyncio.wait({waiter}, timeout=max(0.0, next_check - now))
                    if waiter.done():
                        break
                    if job.state == JobState.QUEUED and time.monotonic() >= queue_deadline:
                        await job.poll()  # a busy event loop may have kept us from hearing it start
                    now = time.monotonic()
                    if job.state == JobState.QUEUED and now >= queue_deadline:
                        raise ProviderTimeout(f"{self.name}: still queued after {queue_limit:g} s",
                                              provider=self.name, job_id=job.id)
                    if job.state != JobState.QUEUED and now >= self._running_since(job) + run_limit:
                        quoted = self.quote.expected_seconds
                        raise ProviderTimeout(
                            f"{self.name}: still running after {run_limit:g} s (quoted {quoted:.1f} s)",
                            provider=self.name, job_id=job.id)
                    if now >= j.deadline:
                        raise ProviderTimeout(f"{self.name}: job still {job.state.value} at the deadline",
                                              provider=self.name, job_id=job.id)
                    if now >= cost_deadline:
                        raise ProviderTimeout(
                            f"{self.name}: stopped at the ${reservation.usd:.5f} reserved for it", provider=self.name,
                            job_id=job.id)
            finally:
                if not waiter.done():
                    waiter.cancel()
        if job.state == JobState.SUCCEEDED and job.output is not None:
            return job.output
        if job.error is not None:
            raise job.error
        if job.state == JobState.LOST:
            raise JobLost(f"{self.name}: job {job.id} was lost", provider=self.name, job_id=job.id)
        raise JobFailed(f"{self.name}: job {job.id} ended {job.state.value} without output", provider=self.name,
                        job_id=job.id)

    @staticmethod
    def _running_since(job: Job) -> float:
        """When ``job`` started running, on the monotonic clock (its timestamps are wall-clock)."""
        started = job.timestamps.get("running")
        if started is None:
            return time.monotonic()
        return time.monotonic() - max(0.0, time.time() - started)

    def _affordable_seconds(self, reservation: Reservation, job: Job) -> float:
        """Running seconds the reservation pays for, after the idle tail and the cold start it waited on."""
        row = self.manager.catalog.price(self.provider.kind, self.provider.capabilities.hardware)
        if row is None or row.usd_per_second <= 0:
            return float("inf")
        idle = row.idle_s if row.bills_idle else 0.0
        queued = job.seconds_in(JobState.QUEUED) or 0.0
        cold = min(queued, row.cold_start_s) if row.bills_cold_start else 0.0
        return max(0.0, reservation.usd / row.usd_per_second - idle - cold)

    async def _cancel_if_running(self, job: Job | None) -> None:
        """Cancel an unfinished job; one whose cancel is unconfirmed keeps ``cancel_pending`` (see ``_close``)."""
        if job is None or (job.state.terminal and not job.cancel_pending):
            return
        try:
            await asyncio.shield(job.cancel(patience_s=self.manager.settings.manager.cancel_patience_s))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in the adapter's cancel: keep the job pending, never "done"
            job.cancel_pending = True
            self.manager.health_board[self.name].last_error = f"cancel failed: {exc}"

    def _close(self, reservation: Reservation, job: Job | None, outcome: str, error: BrokerError | None,
               started_wall: float, t0: float, permit: Permit) -> None:
        m, j = self.manager, self.job
        ended = time.time()
        bill = bill_of(m.catalog, self.provider, job)
        billed, cost, estimated = bill.billed_seconds, bill.cost_usd, bill.estimated
        if job is not None and job.cancel_pending:
            # Abandoned, and the provider has not confirmed it stopped: the row stays open (``cancelling``,
            # reservation held) until the reconciler gets the confirmation and the final bill.
            m.reconciler.adopt(self.provider, job, reservation,
                               message=f"{outcome}: {error.message}" if error else outcome)
        else:
            m.accountant.settle(
                reservation, outcome, provider_job_id=job.id if job else None, error_class=type(error).__name__
                if error else None, message=error.message if error else None, ended_at=ended, **bill.fields(),
            )
        j.record(Attempt(
            provider=self.name, outcome=outcome, provider_job_id=job.id if job else None,  # type: ignore[arg-type]
            error_class=type(error).__name__ if error else None, message=error.message if error else None,
            seconds=ended - started_wall, billed_seconds=billed, cost_usd=cost, cost_estimated=estimated,
            started_at=started_wall, ended_at=ended,
        ))
        health = m.health_board[self.name]
        now = time.monotonic()
        if outcome == "succeeded":
            j.report.provider = self.name
            queue_s = job.seconds_in(JobState.QUEUED) if job else None
            health.observe_success(now - t0, queue_s, now, permit)
        elif outcome == "cancelled":
            health.breaker.release(permit)
            health.last_activity = now
        else:
            assert error is not None
            counts = counts_against_provider(error) and not isinstance(error, CircuitOpen)
            health.observe_failure(f"{type(error).__name__}: {error.message}", now, permit, counts=counts,
                                   retry_after=getattr(error, "retry_after", None))

    # -- streaming ----------------------------------------------------------------------------
    async def stream(self) -> AsyncGenerator[AudioChunk, None]:
        """One streaming try: chunks as they come. Bad first chunks fail over; later trouble is raised."""
        m, j = self.manager, self.job
        health = m.health_board[self.name]
        permit = health.breaker.acquire()
        if permit is None:
            raise CircuitOpen(f"{self.name}: circuit open", provider=self.name)
        try:
            reservation = await m.accountant.open(
                j.id, self.name, quote_usd=self.quote.expected_usd, hardware=self.provider.capabilities.hardware,
                task=j.request.task, expires_at=time.time() + j.remaining() + 300.0, max_usd=j.max_usd,
                billable=self.billable, wait_until=j.deadline, tenant=j.tenant)
        except BudgetExceeded as exc:
            health.breaker.release(permit)
            j.record(Attempt(provider=self.name, outcome="skipped", error_class="BudgetExceeded",
                             message=exc.message, started_at=time.time(), ended_at=time.time()))
            raise
        started_wall, t0 = time.time(), time.monotonic()
        job: Job | None = None
        pieces: list[Audio] = []
        chunks: AsyncIterator[AudioChunk] | None = None
        try:
            async with asyncio.timeout(max(0.0, j.deadline - t0)):
                job = await self.provider.submit(j.request, stream=True)
            self.current = job
            await m.accountant.started(reservation, job.id)  # write-ahead: on disk before we wait on it
            chunks = aiter(job.stream())
            while True:
                # The deadline bounds each wait for the provider, never our consumer's pace (no yield
                # inside a timeout block: it would cancel whatever the consumer awaits meanwhile).
                try:
                    async with asyncio.timeout(max(0.0, j.deadline - time.monotonic())):
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                if chunk.is_end:
                    continue  # the provider's end marker; ours follows the whole-stream validation
                if not len(chunk.audio) or not np.isfinite(chunk.audio.samples).all():
                    raise BadOutput(f"{self.name}: streamed chunk {chunk.index} is empty or not finite",
                                    provider=self.name, retryable=False)
                pieces.append(chunk.audio)
                # a piece goes on the moment it checks out; a provider's own `final` moves to the end marker
                yield AudioChunk(chunk.audio, chunk.index, text=chunk.text) if chunk.final else chunk
            if not pieces:
                raise BadOutput(f"{self.name}: the stream ended without audio", provider=self.name, retryable=False)
            # one joined copy serves the whole-stream check and the job's result
            joined = pieces[0] if len(pieces) == 1 else Audio.concat(pieces)
            if m.settings.manager.validate_output:
                text = getattr(j.request, "text", "")
                check_audio(joined, text, getattr(j.request, "max_length_ms", None), provider=self.name)
        except Exception as exc:
            await self._cancel_if_running(job)
            error = as_broker_error(exc, self.name)
            if isinstance(exc, TimeoutError):
                error = ProviderTimeout(f"{self.name}: stream still open at the deadline", provider=self.name)
            self._close(reservation, job, _outcome_for(error, job), error, started_wall, t0, permit)
            raise error from None
        except BaseException:  # the consumer stopped early (GeneratorExit) or we were cancelled
            await self._cancel_if_running(job)
            self._close(reservation, job, "cancelled", None, started_wall, t0, permit)
            raise
        finally:
            closer = getattr(chunks, "aclose", None)
            if closer is not None:
                try:
                    await closer()
                except Exception:  # the provider's stream is being abandoned anyway
                    pass
        await self._succeeded(joined, reservation, job, started_wall, t0, permit)
        j.streamed = joined
        yield AudioChunk.end(len(pieces), joined.sample_rate)


def _outcome_for(error: BrokerError, job: Job | None) -> str:
    if isinstance(error, InvalidRequest):
        return "rejected"
    if isinstance(error, JobLost) or (job is not None and job.state == JobState.LOST):
        return "lost"
    return "failed"
