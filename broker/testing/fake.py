"""Scripted fake providers: a real ``Provider``/``Job`` whose every job follows a script.

Use them to test code that calls broker without any cloud account, and to rehearse failures::

    flaky = FakeProvider("flaky", script={"ok": 0.7, "unavailable": 0.2, "lost": 0.1}, seed=1)
    slow = FakeProvider("slow", script=["stuck", "ok"], latency_s=0.2, usd_per_second=0.0004)
    manager = CloudGPUManager([flaky, slow], catalog=fake_catalog(flaky, slow))

Behaviours (one per submitted job):

=============== ===================================================================
``ok``           queued ``queue_s``, running ``latency_s``, then plausible audio/video; billed
                 ``usd_per_second`` × the seconds it ran (or a fixed ``billed_seconds``)
``unavailable``  ``submit`` raises ``ProviderUnavailable`` (an HTTP 5xx)
``rate_limited`` ``submit`` raises ``RateLimited`` with ``retry_after=retry_after_s``
``transport``    ``submit`` raises ``ConnectionResetError`` (the network, not the API)
``invalid``      ``submit`` raises ``InvalidRequest``
``stuck``        accepted, then sits in the queue until cancelled
``hang``         starts running and never finishes (times out)
``failed``       runs, then fails with ``JobFailed``
``lost``         runs, then dies mid-job (``JobLost``, state ``lost``)
``silent``       succeeds with silent audio (a video with the wrong frame count)
``truncated``    succeeds with audio far too short for the text
``nan``          succeeds with NaN samples
=============== ===================================================================

Every job is kept in ``provider.jobs`` so a test can check none was left running.

A latency model for scale tests: ``rtf`` adds run time in proportion to the audio made (seconds of
compute per second of audio); ``max_concurrency`` gives the endpoint that many workers (jobs beyond
them wait in its queue), each starting cold once (``cold_start_s``) and staying warm after; and
``time_scale`` runs the clock fast (0.01: a 15 s job sleeps 0.15 s) while bills and reports stay in
model seconds, so a 64-worker book finishes in seconds.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

import numpy as np

from broker.errors import InvalidRequest, JobFailed, JobLost, ProviderUnavailable, RateLimited
from broker.media import SAMPLE_RATE, Audio, AudioChunk, Video, frames_for
from broker.money.pricing import Catalog, PriceRow
from broker.providers.base import BackgroundJob, Billing, Capabilities, HealthReport, Job, JobState, Provider, Request
from broker.types import RenderRequest, SpeechRequest, estimate_speech_seconds

BEHAVIOURS = ("ok", "unavailable", "rate_limited", "transport", "invalid", "stuck", "hang", "failed", "lost",
              "silent", "truncated", "nan")
_SUBMIT_ERRORS = ("unavailable", "rate_limited", "transport", "invalid")
_FOREVER = 10**9

Script = Sequence[str] | Mapping[str, float] | Callable[[random.Random], str]

_TONES: dict[int, np.ndarray] = {}


def _tone(seconds: float) -> np.ndarray:
    """A 220 Hz tone, cached by length: plausible audio that costs nothing to make.

    Outputs of the same length share this buffer (a fake answers thousands of jobs a second);
    copy it before writing to it."""
    n = max(1, round(seconds * 10) * SAMPLE_RATE // 10)
    arr = _TONES.get(n)
    if arr is None:
        t = np.arange(n, dtype=np.float32) / SAMPLE_RATE
        arr = (0.3 * np.sin(2 * np.pi * 220.0 * t)).astype(np.float32)
        _TONES[n] = arr
    return arr


def _audio_seconds(request: Request) -> float:
    if isinstance(request, SpeechRequest):
        seconds = estimate_speech_seconds(request.text) * 0.9
        if request.max_length_ms is not None:
            seconds = min(seconds, request.max_length_ms / 1000.0)
        return seconds
    return request.audio_seconds_hint()


def make_output(request: Request, behaviour: str = "ok") -> Audio | Video:
    """What a provider following ``behaviour`` returns for ``request``."""
    seconds = _audio_seconds(request)
    if isinstance(request, RenderRequest):
        frames = frames_for(seconds, request.fps)
        if behaviour in ("silent", "truncated", "nan"):
            frames = max(1, frames // 4)  # the video stops early: frame count no longer matches its audio
        data = b"\x00\x00\x00\x18ftypisom" + bytes(64)
        return Video(data, request.fps, frames, request.size, request.size, seconds)
    if behaviour == "silent":
        return Audio(np.zeros(int(seconds * SAMPLE_RATE) or 1, dtype=np.float32))
    if behaviour == "truncated":
        return Audio(_tone(max(0.1, seconds * 0.05)))
    if behaviour == "nan":
        arr = _tone(seconds).copy()
        arr[len(arr) // 2] = np.nan
        return Audio(arr)
    return Audio(_tone(seconds))


class FakeJob(BackgroundJob):
    request: Request

    def __init__(self, provider: FakeProvider, request: Request, behaviour: str, stream: bool) -> None:
        super().__init__(provider.name, f"fake-{uuid.uuid4().hex[:12]}", request)
        self.behaviour = behaviour
        self.cancel_called = False
        self._provider = provider
        self._stream = stream
        self._run_started: float | None = None
        self._model_s: float | None = None
        pooled = provider._slots is not None
        self._cold = False if pooled else provider._take_cold_start()
        fast = provider.queue_s == 0 and provider.latency_s == 0 and not provider.rtf and not pooled
        if behaviour == "ok" and fast and not self._cold:
            # Zero-latency fast path: done before submit returns, like a provider answering synchronously.
            self._set_state(JobState.RUNNING)
            self._run_started = time.monotonic()
            self._finish()
            self._task = None
        else:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        p = self._provider
        if self.behaviour == "stuck":
            await asyncio.sleep(_FOREVER)
        if p.queue_s:
            await asyncio.sleep(p.queue_s * p.time_scale)
        if p._slots is None:
            await self._work()
            return
        async with p._slots:  # wait in the endpoint's queue for one of its workers
            self._cold = p._take_worker()
            try:
                await self._work()
            finally:
                p._idle_workers += 1

    async def _work(self) -> None:
        p = self._provider
        self._set_state(JobState.RUNNING)
        self._run_started = time.monotonic()
        if self._cold:
            await asyncio.sleep(p.cold_start_s * p.time_scale)
        if self.behaviour == "hang":
            await asyncio.sleep(_FOREVER)
        seconds = p.latency_s + (p.rtf * _audio_seconds(self.request) if p.rtf else 0.0)
        if seconds:
            await asyncio.sleep(seconds * p.time_scale)
        if p.rtf is not None or p._slots is not None:
            # the model's seconds, not the (scaled, loaded) clock's: the event loop's lag is not billed
            self._model_s = seconds + (p.cold_start_s if self._cold else 0.0)
        self._finish()

    def _finish(self) -> None:
        self.billing = self._bill()
        if self.behaviour == "failed":
            self._fail(JobFailed("worker raised RuntimeError: CUDA error", provider=self.provider, job_id=self.id))
        elif self.behaviour == "lost":
            self._fail(JobLost("worker died mid-job", provider=self.provider, job_id=self.id), JobState.LOST)
        else:
            self._succeed((self._provider.make or make_output)(self.request, self.behaviour))

    def _bill(self) -> Billing:
        p = self._provider
        ran = (time.monotonic() - self._run_started) / p.time_scale if self._run_started is not None else 0.0
        if self._model_s is not None:
            ran = self._model_s
        billed = ran + (p.idle_billed_s if self._run_started is not None else 0.0)
        if p.billed_seconds is not None and self._run_started is not None:
            billed = p.billed_seconds  # a fixed bill, whatever the clock says (deterministic budget tests)
        return Billing(billed_seconds=billed, cost_usd=billed * p.usd_per_second, estimated=False,
                       hardware=p.capabilities.hardware, run_seconds=ran)

    async def _cancel(self) -> None:
        self.cancel_called = True
        self._provider.cancels += 1
        if self._task is not None:
            self._task.cancel()
        self.billing = self._bill()

    async def stream(self) -> AsyncIterator[AudioChunk]:
        if not self._stream:
            async for chunk in super().stream():
                yield chunk
            return
        await self.wait()
        if self.error is not None:
            raise self.error
        out = self.output
        if not isinstance(out, Audio):
            raise TypeError("only speech jobs stream audio")
        parts = np.array_split(out.samples, 3)
        for i, part in enumerate(parts):
            await asyncio.sleep(0)
            yield AudioChunk(Audio(part, out.sample_rate), i, final=i == len(parts) - 1)


class GoneJob(BackgroundJob):
    """A fake job looked up by id from another process (``FakeProvider.attach``). A fake's jobs live in the
    process that ran them, so one whose process died is gone: lost, and it billed nothing more."""

    def __init__(self, provider: FakeProvider, job_id: str) -> None:
        super().__init__(provider.name, job_id, None)
        self.billing = Billing(billed_seconds=0.0, cost_usd=0.0, estimated=False,
                               hardware=provider.capabilities.hardware, run_seconds=0.0)
        self._fail(JobLost("the process that ran this fake job is gone", provider=provider.name, job_id=job_id),
                   JobState.LOST)

    async def _run(self) -> None:
        return None


class FakeProvider(Provider):
    """A provider whose jobs follow ``script``; see the module docstring for the behaviours."""

    def __init__(
        self,
        name: str = "fake",
        *,
        script: Script = ("ok",),
        latency_s: float = 0.0,
        queue_s: float = 0.0,
        cold_start_s: float = 0.0,
        idle_billed_s: float = 0.0,
        usd_per_second: float = 0.0,
        billed_seconds: float | None = None,
        hardware: str = "fake-gpu",
        retry_after_s: float | None = 0.05,
        queue_timeout_s: float | None = None,
        healthy: bool = True,
        seed: int | None = 0,
        tasks: frozenset[str] = frozenset({"speech", "render"}),
        engines: frozenset[str] = frozenset({"piper", "csm"}),
        streaming: bool = True,
        rtf: float | None = None,
        max_concurrency: int | None = None,
        time_scale: float = 1.0,
        make: Callable[[Request, str], Audio | Video] | None = None,
        keep_jobs: bool = True,
        kind: str | None = None,
    ) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self.name = name
        #: price rows key on the kind: by default each fake is a kind of its own, priced by ``price_row``
        self.kind = kind or name
        self.rtf = rtf
        self.max_concurrency = max_concurrency
        self.time_scale = time_scale
        #: what a job returns, given its request and behaviour (default ``make_output``)
        self.make = make
        #: keep every job (and its output) in ``jobs``; a memory test of a long book turns this off
        self.keep_jobs = keep_jobs
        self._slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        self._idle_workers = 0
        #: workers started (each paid one cold start)
        self.workers_started = 0
        self.latency_s = latency_s
        self.queue_s = queue_s
        self.cold_start_s = cold_start_s
        self.idle_billed_s = idle_billed_s
        self.usd_per_second = usd_per_second
        self.billed_seconds = billed_seconds
        self.retry_after_s = retry_after_s
        self.queue_timeout_s = queue_timeout_s
        self.healthy = healthy
        self.capabilities = Capabilities(tasks=tasks, engines=engines, streaming=streaming, hardware=hardware)
        self.rng = random.Random(seed)
        self._next = self._behaviour_source(script)
        self.jobs: list[FakeJob] = []
        self.submits = 0
        self.cancels = 0
        self.health_probes = 0
        self._warm = False

    def _behaviour_source(self, script: Script) -> Callable[[], str]:
        if callable(script):
            return lambda: script(self.rng)  # type: ignore[operator]
        if isinstance(script, Mapping):
            names, weights = list(script), list(script.values())
            for n in names:
                _check(n)
            return lambda: self.rng.choices(names, weights)[0]
        steps = [_check(s) for s in script] or ["ok"]
        it = itertools.chain(steps, itertools.repeat(steps[-1]))
        return lambda: next(it)

    def _take_cold_start(self) -> bool:
        cold = self.cold_start_s > 0 and not self._warm
        self._warm = True
        return cold

    def _take_worker(self) -> bool:
        """A free worker for the next job: a warm one if any is idle, else a new one (cold when modelled)."""
        if self._idle_workers:
            self._idle_workers -= 1
            return False
        self.workers_started += 1
        return self.cold_start_s > 0

    def set_script(self, script: Script) -> None:
        self._next = self._behaviour_source(script)

    async def submit(self, request: Request, *, stream: bool = False) -> Job:
        self.submits += 1
        behaviour = self._next()
        if behaviour == "unavailable":
            raise ProviderUnavailable(f"{self.name}: 503 Service Unavailable", provider=self.name, status_code=503)
        if behaviour == "rate_limited":
            raise RateLimited(f"{self.name}: 429 Too Many Requests", provider=self.name,
                              retry_after=self.retry_after_s, status_code=429)
        if behaviour == "transport":
            raise ConnectionResetError(f"connection to {self.name} reset by peer")
        if behaviour == "invalid":
            raise InvalidRequest("text", f"{self.name} rejects this text")
        job = FakeJob(self, request, behaviour, stream)
        if self.keep_jobs:
            self.jobs.append(job)
        return job

    def attach(self, job_id: str) -> Job | None:
        """One of this fake's jobs by id: still here if this process ran it, else gone (``GoneJob``)."""
        return next((j for j in self.jobs if j.id == job_id), None) or GoneJob(self, job_id)

    async def health(self) -> HealthReport:
        self.health_probes += 1
        return HealthReport(ok=self.healthy, detail="scripted", latency_s=0.0)

    def price_row(self) -> PriceRow:
        """The catalog row that prices this fake like a real provider (per second, cold start billed)."""
        return PriceRow(provider=self.kind.lower(), hardware=(self.capabilities.hardware.lower(),), profile="gpu",
                        usd_per_second=self.usd_per_second, min_billed_s=0.0, increment_s=0.0,
                        cold_start_s=self.cold_start_s, idle_s=self.idle_billed_s, basis="config",
                        billing_model="scripted fake", source="broker.testing.fake")

    def left_running(self) -> list[FakeJob]:
        """Jobs neither finished nor cancelled (a manager that abandons work leaves some here)."""
        return [j for j in self.jobs if not j.state.terminal]


def _check(name: str) -> str:
    if name not in BEHAVIOURS:
        raise ValueError(f"unknown fake behaviour {name!r}; choose from {', '.join(BEHAVIOURS)}")
    return name


def fake_catalog(*providers: FakeProvider, base: Catalog | None = None) -> Catalog:
    """The packaged catalog plus a price row for each fake."""
    return (base or Catalog.packaged()).with_prices(p.price_row() for p in providers)


__all__ = ["BEHAVIOURS", "FakeJob", "FakeProvider", "fake_catalog", "make_output"]
