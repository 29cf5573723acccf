"""CloudGPUManager: a Provider that routes each job to the best endpoint it manages, and pays attention.

Which endpoints (and local's place) come from ``broker.providers.endpoints.resolve``: every configured
endpoint unless ``manager.providers`` names some, local per ``manager.local``. For each job: quote every
capable endpoint (catalog × profile, priced by kind + hardware, with what health has observed),
drop the ones whose circuit is open or that cost more than the per-job cap, rank the rest with
the policy (cheapest by default), and try them in turn — each provider at most once per job,
with same-provider retries for rate limits and 5xx by error class — ending at the local
provider. Budgets are reserved before dispatch and settled after; every attempt goes to the
ledger and into the ``JobReport`` on the output. When nothing can take the job now but a
provider's circuit will half-open before the deadline, the job waits for it instead of failing.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any

from broker._sync import run_sync
from broker.errors import AllProvidersFailed, BrokerError, BudgetExceeded, JobFailed, OutputNotKept
from broker.media import Audio, AudioChunk, Video
from broker.money.budget import Accountant, Budget, TenantBudget
from broker.money.pricing import WARM_P_COLD, Catalog, PriceRow
from broker.providers import endpoints
from broker.providers.base import Billing, Capabilities, HealthReport, Job, JobState, Provider, Request
from broker.routing.attempt import ProviderRun, SinkFailed
from broker.routing.context import OutputSink
from broker.routing.health import BreakerConfig, HealthBoard
from broker.routing.policy import Candidate, DropOverBudget, DropUnpriced, Policy, RankContext, Ranking, as_policy
from broker.routing.reconcile import Reconciler
from broker.routing.retry import Action, RetryRules, classify
from broker.settings import Settings
from broker.store import LedgerStore, SharedHealth, open_shared_health, open_store
from broker.types import Attempt, JobReport, Quote, RenderRequest, Segment, SpeechRequest, build

log = logging.getLogger("broker.routing.manager")

Output = Audio | Video
_ROUTING_OPTIONS = ("deadline_s", "max_usd", "policy")
#: how long closing the manager waits for abandoned jobs' cancels to be confirmed
ABANDONED_CANCEL_WAIT_S = 15.0


class ManagedJob(Job):
    """The manager's job: walks the ranked providers in a background task (or, streaming, as chunks are read)."""

    request: Request

    def __init__(self, manager: CloudGPUManager, request: Request, stream: bool, *,
                 deadline_s: float | None = None, max_usd: float | None = None, policy: Any = None,
                 prefer: Sequence[str] = (), avoid: Sequence[str] = (), job_id: str | None = None,
                 tenant: TenantBudget | None = None, on_output: OutputSink | None = None) -> None:
        super().__init__(manager.name, job_id or uuid.uuid4().hex, request)
        self.report = JobReport(job_id=self.id, task=request.task)
        self.max_usd = max_usd
        self.tenant = tenant
        # a long job's scheduler steers each piece: its chosen endpoint first, saturated ones last
        self.prefer, self.avoid = tuple(prefer), frozenset(avoid)
        self.policy = as_policy(policy) if policy is not None else manager.policy
        ms = manager.settings.manager
        self.deadline_s = deadline_s or ms.deadline_s or ms.default_deadline_s
        self._t0 = time.monotonic()
        self.deadline = self._t0 + self.deadline_s
        self.streamed: Audio | None = None
        self.on_output = on_output
        self._manager = manager
        self._stream = stream
        self._tried: set[str] = set()
        self._runs: list[ProviderRun] = []
        self._ran_on: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._inner: AsyncGenerator[AudioChunk, None] | None = None
        self._dropped: list[tuple[Candidate, str]] = []
        if not stream:
            self._task = asyncio.get_running_loop().create_task(self._run())

    @property
    def providers_tried(self) -> list[str]:
        """The providers this job went to, in order (each at most once; retries stay inside one)."""
        return [r.name for r in self._runs] or self._ran_on

    # -- bookkeeping used by ProviderRun ---------------------------------------------------------
    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def record(self, attempt: Attempt) -> None:
        self.report.attempts.append(attempt)
        self.report.cost_usd += attempt.cost_usd

    def alternatives_left(self, current: str) -> bool:
        """Is there another provider this job has not tried that could take it now?"""
        m = self._manager
        now = time.monotonic()
        return any(
            p.name != current and p.name not in self._tried and m.health_board[p.name].usable(now)
            and m.supports(p, self.request) is None
            for p in m.all_providers
        )

    # -- routing ---------------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            await self._run_routes()
        finally:
            # each ProviderRun points back at this job; dropping them once it has ended breaks the cycle,
            # so the output is freed when the caller lets go of it, not at some late full GC (a book's
            # pieces would otherwise pile up)
            self._ran_on = [r.name for r in self._runs]
            self._runs = []

    async def _run_routes(self) -> None:
        try:
            out = await self._route()
        except BrokerError as exc:
            self._finish_report()
            self._fail(exc)
            return
        except SinkFailed as exc:  # the provider's work is done and billed: say what failed, typed
            self._finish_report()
            self._fail(OutputNotKept(str(exc)))
            return
        except Exception as exc:  # a bug here must still end the job with a typed error
            log.exception("job %s: internal error while routing", self.id)
            self._finish_report()
            self._fail(JobFailed(f"internal error in the manager: {type(exc).__name__}: {exc}"))
            return
        self._finish_report(out)
        out.report = self.report
        self._succeed(out)

    def _finish_report(self, out: Output | None = None) -> None:
        r = self.report
        r.wall_seconds = time.monotonic() - self._t0
        billed = sum(a.billed_seconds or 0.0 for a in r.attempts)
        self.billing = Billing(billed_seconds=billed, cost_usd=r.cost_usd,
                               estimated=any(a.cost_estimated for a in r.attempts if a.cost_usd))
        if isinstance(out, Audio):
            r.audio_seconds = out.duration_s
        elif isinstance(out, Video):
            r.audio_seconds, r.frames, r.fps = out.audio_seconds, out.frames, out.fps

    def _plan(self) -> Ranking:
        plan = self._manager.plan(self.request, exclude=self._tried, deadline_s=self.remaining(),
                                  max_usd=self.max_usd, policy=self.policy, tenant=self.tenant)
        if self.prefer or self.avoid:
            plan.ordered = steer(plan.ordered, self.prefer, self.avoid, self._manager.fallback)
        return plan

    async def _next_plan(self) -> Ranking | None:
        """The providers to try next; waits for a circuit to half-open when none can take the job now."""
        while True:
            if time.monotonic() >= self.deadline:
                return None
            plan = self._plan()
            self._dropped = plan.dropped
            if plan.ordered:
                return plan
            wake = self._manager._next_chance(self.request, self._tried)
            if wake is None or wake >= self.deadline:
                return None
            await asyncio.sleep(max(0.001, wake - time.monotonic()))

    async def _route(self) -> Output:
        last_abort: BrokerError | None = None
        while (plan := await self._next_plan()) is not None:
            first = plan.ordered[0]
            self._tried.add(first.name)
            try:
                return await self._race(first, plan.ordered[1:])
            except BrokerError as exc:
                if classify(exc) is Action.ABORT:
                    last_abort = exc
                    break
                log.info("job %s: %s failed (%s: %s); trying the next provider", self.id, first.name,
                         type(exc).__name__, exc.message)
        if last_abort is not None:
            raise last_abort
        raise self._final_error()

    def _final_error(self) -> BrokerError:
        attempts = self.report.attempts
        over_cap = [(c, why) for c, why in self._dropped if why.endswith(DropOverBudget.REASON)]
        if not attempts and over_cap and len(over_cap) == len(self._dropped):
            return BudgetExceeded("every provider that could take this job costs more than its cap:\n" + "\n".join(
                f"  {c.name}: {why}" for c, why in over_cap))
        if attempts and all(a.outcome == "skipped" for a in attempts):
            return BudgetExceeded("every provider that could take this job is over budget:\n" + "\n".join(
                f"  {a.provider}: {a.message}" for a in attempts))
        if time.monotonic() >= self.deadline:
            why = f"the {self.deadline_s:g} s deadline passed"
        elif not attempts:
            why = "no provider can take this job now"
        else:
            why = "every provider failed"
        dropped = "".join(f"\n  {c.name}: not tried: {reason}" for c, reason in self._dropped)
        return AllProvidersFailed(f"{why} ({len(attempts)} attempts){dropped}", attempts)

    async def _race(self, first: Candidate, backups: list[Candidate]) -> Output:
        """Run ``first``; with hedging on, start the next provider if ``first`` has not started in time."""
        m = self._manager
        primary = ProviderRun(m, self, first)
        self._runs.append(primary)
        hedge_after = m.settings.manager.hedge_after_s
        if hedge_after is None or not backups:
            return await primary.run()
        tasks: dict[asyncio.Task[Output], ProviderRun] = {asyncio.ensure_future(primary.run()): primary}
        hedge_at: float | None = time.monotonic() + hedge_after
        errors: list[BrokerError] = []
        try:
            while tasks:
                timeout = None if hedge_at is None else max(0.0, hedge_at - time.monotonic())
                done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    hedge_at = None
                    run = self._hedge(primary, backups)
                    if run is not None:
                        tasks[asyncio.ensure_future(run.run())] = run
                    continue
                for t in done:
                    tasks.pop(t)
                    exc = t.exception()
                    if exc is None:
                        return t.result()
                    if not isinstance(exc, BrokerError):
                        raise exc
                    if classify(exc) is Action.ABORT:
                        raise exc
                    errors.append(exc)
            raise errors[-1]
        finally:
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    def _hedge(self, primary: ProviderRun, backups: list[Candidate]) -> ProviderRun | None:
        if primary.running():
            return None  # it started: a hedge would only double the bill
        cap = self._manager.settings.manager.hedge_max_usd
        now = time.monotonic()
        for c in backups:
            if c.name in self._tried or not self._manager.health_board[c.name].usable(now):
                continue
            if cap is not None and primary.reserved_usd + c.usd > cap:
                continue
            self._tried.add(c.name)
            run = ProviderRun(self._manager, self, c, hedge=True)
            self._runs.append(run)
            return run
        return None

    # -- the Job interface ---------------------------------------------------------------------------
    async def _refresh(self) -> None:
        await asyncio.sleep(0)

    @property
    def state(self) -> JobState:
        if self._state == JobState.QUEUED and any(r.running() for r in self._runs):
            self._set_state(JobState.RUNNING)
        return self._state

    def _ensure_task(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self._task

    async def wait(self, timeout: float | None = None) -> JobState:
        if not self._state.terminal:
            try:
                await asyncio.wait_for(asyncio.shield(self._ensure_task()), timeout)
            except TimeoutError:
                pass
        return self._state

    async def _cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        inner = self._inner
        if inner is not None:
            try:
                await inner.aclose()
            except RuntimeError:  # it is running right now in the consumer's task, which will stop it
                pass

    async def stream(self) -> AsyncIterator[AudioChunk]:
        if not self._stream:
            async for chunk in super().stream():
                yield chunk
            return
        delivered = False
        while (plan := await self._next_plan()) is not None:
            cand = plan.ordered[0]
            self._tried.add(cand.name)
            run = ProviderRun(self._manager, self, cand)
            self._runs.append(run)
            inner = self._inner = run.stream()
            end: AudioChunk | None = None
            try:
                async for chunk in inner:
                    if chunk.is_end:
                        end = chunk  # sent once the job is settled, below
                        continue
                    delivered = True
                    yield chunk
            except BrokerError as exc:
                # Once audio has reached the caller a failover would repeat it: stop here instead.
                if delivered or classify(exc) is Action.ABORT:
                    self._finish_report()
                    self._fail(exc)
                    raise
                continue
            finally:
                # Closing explicitly (not at garbage collection) cancels the provider's job right now.
                self._inner = None
                await inner.aclose()
            self._finish_report(self.streamed)
            if self.streamed is not None:
                self.streamed.report = self.report
                self._succeed(self.streamed)
            if end is not None:
                yield end  # `final` reaches the caller only once the job has succeeded
            return
        err = self._final_error()
        self._finish_report()
        self._fail(err)
        raise err


class CloudGPUManager(Provider):
    """Drop-in for a local model: ``generate_speech``/``render`` run wherever is best right now."""

    name = "manager"

    def __init__(
        self,
        providers: Sequence[Provider | str] | None = None,
        *,
        settings: Settings | None = None,
        policy: Policy | Callable[..., Any] | str | None = None,
        catalog: Catalog | None = None,
        ledger: LedgerStore | None = None,
        shared_health: SharedHealth | None = None,
    ) -> None:
        self.settings = settings or Settings()
        ms = self.settings.manager
        # Which endpoints, and local's place: manager.providers (or every configured one) and manager.local.
        routing = endpoints.resolve(self.settings, providers)
        self.providers: list[Provider] = routing.ranked
        self.fallback: Provider | None = routing.fallback
        #: every endpoint and local, routed or not, with the reason (`broker providers`, `broker quote`)
        self.endpoints: list[endpoints.EndpointStatus] = routing.rows
        #: endpoint name → why it is not routed
        self.skipped: dict[str, str] = routing.skipped
        self.local_mode = ms.local_mode()
        everyone = self.all_providers
        self.capabilities = Capabilities(
            tasks=frozenset().union(*(p.capabilities.tasks for p in everyone)) if everyone else frozenset(),
            engines=frozenset().union(*(p.capabilities.engines for p in everyone)) if everyone else frozenset(),
            streaming=any(p.capabilities.streaming for p in everyone),
            hardware="mixed",
        )
        self.policy = as_policy(policy if policy is not None else ms.policy)
        self.catalog = _with_local_price(catalog or Catalog.from_settings(self.settings), self.all_providers,
                                         self.settings.local.usd_per_hour)
        # ledger.url (or ledger.path): SQLite by default, PostgreSQL to share budgets and health with a fleet
        self.ledger = ledger or open_store(self.settings)
        self.budget = Budget(ms.max_usd_per_job, ms.daily_budget_usd, ms.monthly_budget_usd, ms.reserve_factor)
        self.accountant = Accountant(self.ledger, self.budget)
        if shared_health is None and ledger is None:
            shared_health = open_shared_health(self.settings)
        self.health_board = HealthBoard(BreakerConfig(ms.breaker_failures, ms.breaker_ejection_s,
                                                      ms.breaker_max_ejection_s), shared=shared_health)
        self.retry_rules = RetryRules(ms.attempts_per_provider, ms.backoff_initial_s, ms.backoff_max_s,
                                      ms.backoff_jitter_s, ms.failover_after_s)
        self.last_report: JobReport | None = None
        self._over_cap = DropOverBudget()
        #: keeps cancelling abandoned jobs until confirmed, and settles dead processes' attempts
        # A shared store's owners beat every few seconds: a silent one is dead after owner_timeout_s, and
        # every process sweeps for such rows as jobs arrive (whoever notices first settles them).
        shared = self.ledger.remote
        self.reconciler = Reconciler(self.accountant, self.catalog, lambda: self.all_providers,
                                     **({"stale_s": self.settings.ledger.owner_timeout_s,
                                         "sweep_every_s": self.settings.ledger.heartbeat_s} if shared else {}))

    @property
    def all_providers(self) -> list[Provider]:
        return self.providers + ([self.fallback] if self.fallback is not None else [])

    # -- quoting and ranking ------------------------------------------------------------------
    def supports(self, provider: Provider, request: Request) -> str | None:
        """Why ``provider`` cannot take ``request`` (its tasks, its engines, the default engine), or None."""
        return provider.capabilities.supports(request, self.settings.engines.default)

    def quote_provider(self, provider: Provider, request: Request) -> Quote:
        """``provider``'s quote for ``request``, using what health has seen of its queue and warmth."""
        if type(provider).quote is not Provider.quote:
            try:
                return provider.quote(request)  # type: ignore[no-any-return]  # the provider prices itself
            except Exception as exc:  # a broken quote must not stop routing: fall back to the catalog
                log.warning("%s: quote failed (%s); using the catalog", provider.name, exc)
        # Prices key on the kind (and hardware); what health has seen keys on the endpoint's name.
        hw = provider.capabilities.hardware
        row = self.catalog.price(provider.kind, hw)
        h = self.health_board[provider.name]
        now = time.monotonic()
        p_cold = None
        if row is not None and row.scales_to_zero:
            p_cold = self.health_board.p_cold(provider.name, row.idle_s, now, WARM_P_COLD)
        q = self.catalog.quote(provider.kind, hw, request, default_engine=self.settings.engines.default,
                               p_cold=p_cold, queue_s=h.queue.value or 0.0)
        return q.model_copy(update={"provider": provider.name})

    def plan(self, request: Request, *, exclude: set[str] | frozenset[str] = frozenset(),
             deadline_s: float | None = None, max_usd: float | None = None, policy: Any = None,
             tenant: TenantBudget | None = None) -> Ranking:
        """Rank the providers for ``request``: ``ordered`` to try (local last), ``dropped`` with reasons."""
        now = time.monotonic()
        candidates: list[Candidate] = []
        dropped: list[tuple[Candidate, str]] = []
        for p in self.providers:
            if p.name in exclude:
                continue
            why = self.supports(p, request) or self._unavailable(p.name, now)
            if why:
                dropped.append((Candidate(p, _placeholder_quote(p)), why))
                continue
            candidates.append(Candidate(p, self.quote_provider(p, request)))
        cap = min((v for v in (self.settings.manager.max_usd_per_job, max_usd) if v is not None), default=None)
        if self.budget.active or max_usd is not None or (tenant is not None and tenant.active):
            # an unknown price is not $0: no budget could hold it
            unpriced = DropUnpriced().rank(candidates, RankContext())
            candidates, dropped = unpriced.ordered, dropped + unpriced.dropped
        ctx = RankContext(deadline_s=deadline_s, max_usd=cap)
        chosen = as_policy(policy) if policy is not None else self.policy
        ranking = chosen.rank(self._over_cap.rank(candidates, ctx).ordered, ctx) if cap is not None \
            else chosen.rank(candidates, ctx)
        if cap is not None:
            ranking.dropped[:0] = self._over_cap.rank(candidates, ctx).dropped
        ranking.dropped[:0] = dropped
        fb = self.fallback
        if fb is not None and fb.name not in exclude:
            why = self.supports(fb, request) or self._unavailable(fb.name, now)
            if why:
                ranking.dropped.append((Candidate(fb, _placeholder_quote(fb)), why))
            else:
                ranking.ordered.append(Candidate(fb, self.quote_provider(fb, request)))
        return ranking

    def _unavailable(self, name: str, now: float) -> str | None:
        h = self.health_board[name]
        if h.cooling(now):
            assert h.cooldown_until is not None
            return f"rate limited: asked to wait {h.cooldown_until - now:.1f} s more"
        if not h.breaker.available(now):
            reopen = h.breaker.reopens_at()
            when = f"; trial in {reopen - now:.1f} s" if reopen is not None and reopen > now else ""
            return f"circuit open after repeated failures ({h.last_error or 'failed'}){when}"
        return None

    def _next_chance(self, request: Request, exclude: set[str]) -> float | None:
        """Earliest time an untried, capable provider's circuit half-opens (or its cooldown ends)."""
        now = time.monotonic()
        times = [
            t for p in self.all_providers
            if p.name not in exclude and self.supports(p, request) is None
            and (t := self.health_board[p.name].next_chance(now)) is not None
        ]
        return min(times) if times else None

    def quote(self, request: Request) -> Quote:
        """The quote of the provider this request would go to first."""
        plan = self.plan(request)
        if not plan.ordered:
            reasons = "; ".join(f"{c.name}: {why}" for c, why in plan.dropped) or "no providers configured"
            return Quote(provider=self.name, hardware="none", expected_seconds=float("inf"),
                         expected_usd=0.0, dropped=reasons)
        return plan.ordered[0].quote

    # -- running --------------------------------------------------------------------------------
    async def submit(self, request: Request, *, stream: bool = False, deadline_s: float | None = None,
                     max_usd: float | None = None, policy: Any = None, job_id: str | None = None,
                     prefer: Sequence[str] = (), avoid: Sequence[str] = (),
                     tenant: TenantBudget | None = None, on_output: OutputSink | None = None) -> Job:
        """Accept ``request``; ``job_id`` names the job in the ledger and the report (a caller's own id).
        ``tenant``: whose job it is; its attempts are the tenant's in the ledger, under its budgets too.

        ``prefer``: endpoint names tried first, in that order; ``avoid``: tried only after the rest
        (both soft: ranking, budgets and failover still apply; long jobs use them to spread pieces).
        ``on_output``: awaited with the output before the attempt that made it is settled (see
        ``broker.routing.context.OutputSink``); the gateway keeps the output there."""
        request.check_limits(self.settings.limits)
        self.reconciler.kick()  # settle what a dead process left open (in the background, once)
        if not any(self.supports(p, request) is None for p in self.all_providers):
            reasons = "; ".join(f"{p.name}: {self.supports(p, request)}" for p in self.all_providers)
            raise AllProvidersFailed(f"no configured provider can run this {request.task} job"
                                     + (f" ({reasons})" if reasons else ""))
        return ManagedJob(self, request, stream, deadline_s=deadline_s, max_usd=max_usd, policy=policy,
                          job_id=job_id, prefer=prefer, avoid=avoid, tenant=tenant, on_output=on_output)

    async def arun(self, request: Request, *, timeout: float | None = None, deadline_s: float | None = None,
                   max_usd: float | None = None, policy: Any = None, job_id: str | None = None,
                   tenant: TenantBudget | None = None, on_output: OutputSink | None = None) -> Output:
        job = await self.submit(request, deadline_s=deadline_s or timeout, max_usd=max_usd, policy=policy,
                                job_id=job_id, tenant=tenant, on_output=on_output)
        try:
            # The job ends itself at its deadline; the margin only guards against a stuck adapter.
            out = await job.result(None if timeout is None else timeout + 5.0)
        except BaseException:
            await asyncio.shield(job.cancel())
            if isinstance(job, ManagedJob):
                self.last_report = job.report
            raise
        self.last_report = out.report
        return out

    async def agenerate_speech(self, text: str, speaker: int | str = 0, context: Sequence[Segment] = (),
                               max_length_ms: float | None = None, *, return_tensor: bool | None = None,
                               **options: Any) -> Any:
        """What ``generate_speech`` returns (a tensor when torch is installed, else ``Audio``), awaited."""
        routing = {k: options.pop(k) for k in _ROUTING_OPTIONS if k in options}
        request = build(SpeechRequest, text=text, speaker=speaker, context=list(context),
                        max_length_ms=max_length_ms, **options)
        out = await self.arun(request, **routing)
        assert isinstance(out, Audio)
        want_tensor = _torch_installed() if return_tensor is None else return_tensor
        return out.to_torch() if want_tensor else out

    async def arender(self, audio: Audio | Any | None = None, *, text: str | None = None,
                      avatar: bytes | None = None, **options: Any) -> Video:
        routing = {k: options.pop(k) for k in _ROUTING_OPTIONS if k in options}
        if audio is not None and not isinstance(audio, Audio):
            audio = Audio(audio)
        request = build(RenderRequest, audio=audio, text=text, avatar=avatar, **options)
        out = await self.arun(request, **routing)
        assert isinstance(out, Video)
        return out

    async def astream_speech(self, text: str, speaker: int | str = 0, context: Sequence[Segment] = (),
                             **options: Any) -> AsyncIterator[AudioChunk]:
        routing = {k: options.pop(k) for k in _ROUTING_OPTIONS if k in options}
        request = build(SpeechRequest, text=text, speaker=speaker, context=list(context), **options)
        job = await self.submit(request, stream=True, **routing)
        assert isinstance(job, ManagedJob)
        chunks = job.stream()
        done = False
        try:
            async for chunk in chunks:
                if chunk.final:  # the job has succeeded: a caller may stop here without abandoning it
                    done = True
                    self.last_report = job.report
                yield chunk
            done = True
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]  # now, so the provider job is cancelled now
            self.last_report = job.report
            if not done:
                await asyncio.shield(job.cancel())

    async def aspeak_long(self, text_or_chapters: Any, *, output: Any = None, **options: Any) -> Any:
        """A book (text, or a list of chapters) split, run across endpoints at once, stitched in order;
        returns a ``broker.longform.LongResult``. Options: see ``broker.longform.LongJob``."""
        from broker.longform import aspeak_long

        return await aspeak_long(self, text_or_chapters, output=output, **options)

    def speak_long(self, text_or_chapters: Any, *, output: Any = None, **options: Any) -> Any:
        from broker._sync import run_sync

        return run_sync(self.aspeak_long(text_or_chapters, output=output, **options))

    async def health(self) -> HealthReport:
        """Each provider's circuit state, latency and last error, plus its own probe where it has one."""
        everyone = self.all_providers
        reports = await asyncio.gather(*(_probe(p) for p in everyone))
        now = time.monotonic()
        info: dict[str, Any] = {}
        for p, r in zip(everyone, reports, strict=True):
            snap = self.health_board[p.name].snapshot(now)
            snap.update(probe_ok=r.ok, probe_detail=r.detail, probe_latency_s=r.latency_s)
            info[p.name] = snap
        ok = any(v["probe_ok"] and v["state"] != "open" for v in info.values())
        return HealthReport(ok=ok, detail=f"{sum(1 for v in info.values() if v['probe_ok'])}/{len(info)} healthy",
                            info=info)

    async def aclose(self) -> None:
        await self.reconciler.drain(timeout=ABANDONED_CANCEL_WAIT_S)  # unconfirmed: next process reconciles
        await asyncio.gather(*(p.aclose() for p in self.all_providers), return_exceptions=True)

    def close(self) -> None:
        super().close()
        self.ledger.close()
        self.health_board.close()

    # -- drop-in sync surface ---------------------------------------------------------
    def generate_speech(
        self,
        text: str,
        speaker: int | str = 0,
        context: Sequence[Segment] = (),
        max_length_ms: float | None = None,
        *,
        return_tensor: bool | None = None,
        **options: Any,
    ) -> Any:
        """Like CSM's ``Generator.generate``: a 1-D float tensor when torch is installed, else ``Audio``.

        ``return_tensor=False`` always returns ``Audio`` (with ``.report``); the last job's report is
        also at ``manager.last_report``. ``deadline_s=``, ``max_usd=`` and ``policy=`` route this call.
        """
        return run_sync(self.agenerate_speech(text, speaker, context, max_length_ms, return_tensor=return_tensor,
                                              **options))


async def _probe(p: Provider) -> HealthReport:
    try:
        async with asyncio.timeout(10.0):
            return await p.health()
    except Exception as exc:
        return HealthReport(ok=False, detail=f"{type(exc).__name__}: {exc}")


def steer(ordered: list[Candidate], prefer: Sequence[str], avoid: frozenset[str],
          fallback: Provider | None) -> list[Candidate]:
    """``ordered`` with ``prefer`` first and ``avoid`` just before the local fallback (which stays last)."""
    rank = {name: i for i, name in enumerate(prefer)}

    def key(c: Candidate) -> tuple[int, int]:
        if c.name in rank:
            return (0, rank[c.name])
        if fallback is not None and c.provider is fallback:
            return (3, 0)
        return (2, 0) if c.name in avoid else (1, 0)

    return sorted(ordered, key=key)  # stable: the policy's order holds within each group


def _with_local_price(catalog: Catalog, providers: list[Provider], usd_per_hour: float) -> Catalog:
    """Price the local provider at ``local.usd_per_hour`` (what ranked local competes at) when one is set."""
    local = next((p for p in providers if p.kind == "local"), None)
    if local is None or usd_per_hour <= 0:
        return catalog
    hw = local.capabilities.hardware
    base = catalog.price("local", hw)
    return catalog.with_prices([PriceRow(
        provider="local", hardware=(hw.lower(),), profile=base.profile if base else "cpu-2",
        usd_per_second=usd_per_hour / 3600.0, increment_s=0.0, bills_cold_start=False, bills_idle=False,
        basis="config", billing_model=f"local.usd_per_hour = {usd_per_hour:g}",
    )])


def _placeholder_quote(p: Provider) -> Quote:
    return Quote(provider=p.name, hardware=p.capabilities.hardware, expected_seconds=0.0, expected_usd=0.0)


def _torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


__all__ = ["CloudGPUManager", "ManagedJob"]
