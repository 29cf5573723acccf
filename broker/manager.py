"""CloudGPUManager: a Provider that routes each job to the providers it manages.

This first version tries the configured providers in order and ends at ``local``;
ranking by cost and health, retries, budgets and the ledger build on this shape.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from broker.errors import AllProvidersFailed, BrokerError, InvalidRequest, ProviderNotInstalled
from broker.media import Audio, AudioChunk, Video
from broker.providers import registry
from broker.providers.base import Capabilities, HealthReport, Job, JobState, Provider, Request
from broker.settings import Settings
from broker.types import Attempt, JobReport, Segment, SpeechRequest


class ManagedJob(Job):
    """The manager's job: walks the provider chain in a background task."""

    def __init__(self, manager: CloudGPUManager, request: Request, stream: bool) -> None:
        super().__init__(manager.name, uuid.uuid4().hex, request)
        self.report = JobReport(job_id=self.id, task=request.task)
        self._manager = manager
        self._stream = stream
        self._current: Job | None = None
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        started = time.monotonic()
        for provider in self._manager.chain(self.request):
            attempt_start = time.time()
            try:
                job = await provider.submit(self.request)
                self._current = job
                self._set_state(JobState.RUNNING)
                out = await job.result()
            except InvalidRequest as exc:
                self._record(provider, "rejected", attempt_start, error=exc)
                self._fail(exc)
                return
            except BrokerError as exc:
                self._record(provider, "failed", attempt_start, error=exc)
                continue
            self._record(provider, "succeeded", attempt_start, job=job)
            self.report.provider = provider.name
            self.report.wall_seconds = time.monotonic() - started
            _fill_report(self.report, out)
            out.report = self.report
            self._succeed(out)
            return
        self.report.wall_seconds = time.monotonic() - started
        self._fail(AllProvidersFailed("every provider failed", self.report.attempts))

    def _record(self, provider: Provider, outcome: Any, start: float, *, job: Job | None = None,
                error: BrokerError | None = None) -> None:
        billing = job.billing if job is not None else None
        cost = billing.cost_usd if billing else 0.0
        self.report.attempts.append(
            Attempt(
                provider=provider.name,
                outcome=outcome,
                provider_job_id=job.id if job else None,
                error_class=type(error).__name__ if error else None,
                message=error.message if error else None,
                seconds=time.time() - start,
                billed_seconds=billing.billed_seconds if billing else None,
                cost_usd=cost,
                cost_estimated=billing.estimated if billing else True,
                started_at=start,
                ended_at=time.time(),
            )
        )
        self.report.cost_usd += cost

    async def _refresh(self) -> None:
        await asyncio.sleep(0)

    async def wait(self, timeout: float | None = None) -> JobState:
        if not self._state.terminal:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                pass
        return self._state

    async def _cancel(self) -> None:
        self._task.cancel()
        if self._current is not None:
            await self._current.cancel()


def _fill_report(report: JobReport, out: Audio | Video) -> None:
    if isinstance(out, Audio):
        report.audio_seconds = out.duration_s
    else:
        report.audio_seconds = out.audio_seconds
        report.frames = out.frames
        report.fps = out.fps


class CloudGPUManager(Provider):
    """Drop-in for a local model: ``generate_speech``/``render`` run wherever is best right now."""

    name = "manager"

    def __init__(
        self,
        providers: Sequence[Provider | str] | None = None,
        *,
        settings: Settings | None = None,
    ) -> None:
        self.settings = settings or Settings()
        names_or_providers = list(providers) if providers is not None else list(self.settings.manager.providers)
        self.providers: list[Provider] = []
        self.skipped: dict[str, str] = {}
        for p in names_or_providers:
            if isinstance(p, Provider):
                self.providers.append(p)
                continue
            try:
                self.providers.append(registry.create(p, self.settings))
            except (ProviderNotInstalled, BrokerError) as exc:
                # A provider that is not installed or not configured is skipped, and says why.
                self.skipped[p] = exc.message
        if self.settings.manager.fallback_local and not any(p.name == "local" for p in self.providers):
            try:
                self.providers.append(registry.create("local", self.settings))
            except BrokerError as exc:
                self.skipped["local"] = exc.message
        self.capabilities = Capabilities(
            tasks=frozenset().union(*(p.capabilities.tasks for p in self.providers)) if self.providers
            else frozenset(),
            engines=frozenset().union(*(p.capabilities.engines for p in self.providers)) if self.providers
            else frozenset(),
            streaming=any(p.capabilities.streaming for p in self.providers),
            hardware="mixed",
        )
        self.last_report: JobReport | None = None

    def chain(self, request: Request) -> list[Provider]:
        return [p for p in self.providers if p.capabilities.supports(request) is None]

    async def submit(self, request: Request, *, stream: bool = False) -> Job:
        request.check_limits(self.settings.limits)
        if not self.chain(request):
            raise AllProvidersFailed(f"no configured provider can run this {request.task} job")
        return ManagedJob(self, request, stream)

    async def arun(self, request: Request, *, timeout: float | None = None) -> Audio | Video:
        job = await self.submit(request)
        try:
            out = await job.result(timeout)
        except BaseException:
            await asyncio.shield(job.cancel())
            if isinstance(job, ManagedJob):
                self.last_report = job.report
            raise
        self.last_report = out.report
        return out

    async def astream_speech(
        self, text: str, speaker: int | str = 0, context: Sequence[Segment] = (), **options: Any
    ) -> AsyncIterator[AudioChunk]:
        # Streaming goes to the first provider that streams; others answer in one chunk.
        from broker.types import build

        request = build(SpeechRequest, text=text, speaker=speaker, context=list(context), **options)
        request.check_limits(self.settings.limits)
        errors: list[Attempt] = []
        for provider in self.chain(request):
            started = time.time()
            try:
                job = await provider.submit(request, stream=True)
                async for chunk in job.stream():
                    yield chunk
                return
            except InvalidRequest:
                raise
            except BrokerError as exc:
                errors.append(Attempt(provider=provider.name, outcome="failed", error_class=type(exc).__name__,
                                      message=exc.message, seconds=time.time() - started))
        raise AllProvidersFailed("no provider could stream this job", errors)

    async def health(self) -> HealthReport:
        reports = await asyncio.gather(*(p.health() for p in self.providers), return_exceptions=True)
        pairs = zip(self.providers, reports, strict=True)
        info = {p.name: (r.ok if isinstance(r, HealthReport) else False) for p, r in pairs}
        return HealthReport(ok=any(info.values()), detail="any provider healthy", info=info)

    async def aclose(self) -> None:
        await asyncio.gather(*(p.aclose() for p in self.providers), return_exceptions=True)

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
        also at ``manager.last_report``.
        """
        audio = super().generate_speech(text, speaker, context, max_length_ms, **options)
        want_tensor = _torch_installed() if return_tensor is None else return_tensor
        return audio.to_torch() if want_tensor else audio


def _torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None
