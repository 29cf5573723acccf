"""The local provider: the same engines the handlers run, in this process, on CUDA or the CPU.

It has the full job lifecycle: ``queued`` while waiting for the device (one job at
a time by default, so two renders do not fight over a GPU), ``running`` in a worker
thread, ``cancelled`` cooperatively (engines check a flag between sentences/frames).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from broker import engines
from broker.errors import BrokerError, EngineUnavailable, JobFailed
from broker.media import Audio, AudioChunk, Video
from broker.providers.base import (
    BackgroundJob,
    Billing,
    Capabilities,
    HealthReport,
    Job,
    JobState,
    Provider,
    Request,
)
from broker.settings import Settings
from broker.types import DEFAULT_LIMITS, Limits, RenderRequest, SpeechRequest


class LocalJob(BackgroundJob):
    def __init__(self, provider: LocalProvider, request: Request, stream: bool) -> None:
        super().__init__(provider.name, uuid.uuid4().hex, request)
        self._provider = provider
        self._cancel_event = threading.Event()
        self._chunks: asyncio.Queue[Audio | BaseException | None] | None = asyncio.Queue() if stream else None
        self._start()

    async def _run(self) -> None:
        async with self._provider._slots:
            if self._cancel_event.is_set():
                return
            self._set_state(JobState.RUNNING)
            started = time.perf_counter()
            out: Audio | Video
            try:
                if self._chunks is not None:
                    out = await self._run_stream()
                elif isinstance(self.request, SpeechRequest):
                    out = await asyncio.to_thread(engines.synthesize, self.request, self._cancel_event)
                else:
                    out = await asyncio.to_thread(self._render)
            except asyncio.CancelledError:
                self._cancel_event.set()
                raise
            except BrokerError as exc:
                self._fail(exc)
                return
            except Exception as exc:
                self._fail(JobFailed(f"{type(exc).__name__}: {exc}", provider=self.provider))
                return
            finally:
                run_s = time.perf_counter() - started
                self.billing = self._provider.bill(run_s)
            self._succeed(out)

    def _render(self) -> Video:
        assert isinstance(self.request, RenderRequest)
        return engines.render(self.request, cancel=self._cancel_event)

    async def _run_stream(self) -> Audio:
        assert self._chunks is not None and isinstance(self.request, SpeechRequest)
        loop = asyncio.get_running_loop()
        queue = self._chunks
        pieces: list[Audio] = []

        def produce() -> None:
            try:
                for piece in engines.synthesize_stream(self.request, self._cancel_event):  # type: ignore[arg-type]
                    pieces.append(piece)
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
            except BaseException as exc:
                loop.call_soon_threadsafe(queue.put_nowait, exc)
                raise
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        await asyncio.to_thread(produce)
        return Audio.concat(pieces) if pieces else Audio([])

    async def _cancel(self) -> None:
        # The engine thread stops at its next cancel check; anything it makes after this is discarded.
        self._cancel_event.set()
        await super()._cancel()

    async def stream(self) -> AsyncIterator[AudioChunk]:
        if self._chunks is None:
            async for chunk in super().stream():
                yield chunk
            return
        index = 0
        pending: Audio | None = None
        while True:
            item = await self._chunks.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                await self.wait()
                raise self.error or JobFailed(str(item), provider=self.provider)
            if pending is not None:
                yield AudioChunk(pending, index, final=False, text=pending.text)
                index += 1
            pending = item
        await self.wait()
        if self.error is not None:
            raise self.error
        if pending is not None:
            yield AudioChunk(pending, index, final=True, text=pending.text)


class LocalProvider(Provider):
    name = "local"
    kind = "local"

    def __init__(self, *, device: str = "auto", concurrency: int = 1, limits: Limits = DEFAULT_LIMITS,
                 usd_per_second: float = 0.0) -> None:
        self.device_pref = device
        self.limits = limits
        self.usd_per_second = usd_per_second
        self._slots = asyncio.Semaphore(max(1, concurrency))
        self.capabilities = Capabilities.broker_worker("cpu" if engines.device() == "cpu" else "local-gpu")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> LocalProvider:
        engines.configure(settings.engines, settings.local.device)
        kwargs: dict[str, Any] = {
            "device": settings.local.device,
            "concurrency": settings.local.concurrency,
            "limits": settings.limits,
            # what this machine costs: local competes at it when manager.local = "ranked"
            "usd_per_second": settings.local.usd_per_hour / 3600.0,
        }
        kwargs.update(overrides)
        provider = cls(**kwargs)
        provider.max_concurrency = max(1, settings.local.concurrency)
        return provider

    def bill(self, run_seconds: float) -> Billing:
        return Billing(
            billed_seconds=run_seconds,
            cost_usd=run_seconds * self.usd_per_second,
            estimated=True,
            hardware=self.capabilities.hardware,
            run_seconds=run_seconds,
        )

    async def submit(self, request: Request, *, stream: bool = False) -> Job:
        request.check_limits(self.limits)
        # Engine checks (speaker exists, weights present) raise before the job is queued.
        await asyncio.to_thread(engines.check, request)
        return LocalJob(self, request, stream and isinstance(request, SpeechRequest))

    async def health(self) -> HealthReport:
        started = time.perf_counter()
        try:
            await asyncio.to_thread(engines.speech_engine)
        except EngineUnavailable as exc:
            return HealthReport(ok=False, detail=str(exc))
        return HealthReport(
            ok=True,
            detail=f"engines ready on {engines.device()}",
            latency_s=time.perf_counter() - started,
            info={"device": engines.device()},
        )
