"""The one interface every provider (and the manager itself) implements.

Serverless jobs queue, cold-start, run, stream, get lost and get cancelled, so the
interface is built on a ``Job`` handle; the familiar ``generate_speech``/``render``
calls are thin conveniences over ``submit`` + ``Job.result``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

from broker._sync import iterate_sync, run_sync
from broker.errors import BrokerError, JobCancelled, ProviderTimeout
from broker.media import Audio, AudioChunk, Video
from broker.redact import scrub
from broker.types import RenderRequest, Segment, SpeechRequest, build

Request = SpeechRequest | RenderRequest
Output = Audio | Video


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.LOST)


@dataclass
class Billing:
    """What a job cost, as the provider's metrics show it. Providers report seconds; the money layer
    prices them (``broker.money.pricing.Catalog.settle``). ``estimated`` is True unless the figures are
    the provider's own bill."""

    #: seconds the provider bills for this job by its own rules (run, plus idle tail or setup it bills)
    billed_seconds: float = 0.0
    #: dollars, only when the provider states them (None: price ``billed_seconds`` from the catalog)
    cost_usd: float | None = None
    estimated: bool = True
    hardware: str | None = None
    queue_seconds: float | None = None
    run_seconds: float | None = None
    #: worker start-up this job may have paid for on top of ``billed_seconds``, as far as the metrics
    #: bound it (RunPod hides it inside delayTime); the money layer caps it at the catalog's cold start
    cold_start_seconds: float | None = None


@dataclass(frozen=True)
class Capabilities:
    tasks: frozenset[str] = frozenset({"speech", "render"})
    engines: frozenset[str] = frozenset({"piper"})
    streaming: bool = False
    #: hardware this provider runs on ("cpu", "A100-80GB", ...), used to pick price rows
    hardware: str = "cpu"
    #: largest request body the provider accepts, when it has a limit
    max_payload_bytes: int | None = None

    @classmethod
    def broker_worker(cls, hardware: str, **overrides: Any) -> Capabilities:
        """What a worker running ``broker.worker.handle`` offers: both tasks, streaming, and the engines this
        process really has (built-ins whose dependencies and weights are here, plugins that import);
        a remote worker's adapter passes ``engines=`` with what its endpoint carries."""
        from broker import engines

        fields: dict[str, Any] = {
            "tasks": frozenset({"speech", "render"}),
            "engines": frozenset(engines.available()),
            "streaming": True,
            "hardware": hardware,
        }
        fields.update(overrides)
        return cls(**fields)

    def supports(self, request: Request, default_engine: str | None = None) -> str | None:
        """None when the request fits; otherwise why not (shown by `broker quote`).

        ``default_engine``: the engine a request that names none runs with (``engines.default``), so an
        endpoint that does not carry it is not sent such jobs.
        """
        if request.task not in self.tasks:
            return f"does not run {request.task} jobs"
        engine = request.engine
        synthesises = isinstance(request, SpeechRequest) or getattr(request, "audio", None) is None
        if engine is None and synthesises and default_engine is not None and default_engine not in self.engines:
            return f"does not have the {default_engine!r} engine (the default engine)"
        if engine is not None and engine not in self.engines:
            return f"does not have the {engine!r} engine"
        return None


@dataclass
class HealthReport:
    ok: bool
    detail: str = ""
    latency_s: float | None = None
    #: provider-specific numbers (workers idle/running, jobs in queue, ...)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.detail = scrub(self.detail)  # often an upstream's own words, which may echo our headers


#: poll intervals: quick at first (short jobs finish fast), then back off to spare rate limits
POLL_SCHEDULE = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)
#: how long one ``Job.cancel()`` keeps asking a provider that refuses (429/5xx/timeout) before it
#: hands the job back unconfirmed (the caller keeps it ``cancelling`` and asks again later)
CANCEL_PATIENCE_S = 10.0
#: longest wait between two cancel requests (a Retry-After above it is still honoured)
CANCEL_BACKOFF_MAX_S = 5.0


class Job(ABC):
    """A submitted job. Subclasses implement ``_refresh`` and ``_cancel``; the rest is shared."""

    poll_schedule: Sequence[float] = POLL_SCHEDULE

    def __init__(self, provider: str, job_id: str, request: Request | None) -> None:
        self.provider = provider
        self.id = job_id
        #: None on a job re-attached by id (``Provider.attach``): only its provider knows what it was
        self.request: Request | None = request
        self.timestamps: dict[str, float] = {JobState.QUEUED.value: time.time()}
        self.billing: Billing | None = None
        self.error: BrokerError | None = None
        self.output: Output | None = None
        self._state = JobState.QUEUED
        #: a cancel was asked for and the provider has not confirmed the job stopped
        self.cancel_pending = False
        #: wall-clock time after which the provider ends the job itself whatever we do (RunPod's ttl);
        #: None when the provider sets no such bound
        self.expires_at: float | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.provider}:{self.id} {self._state.value}>"

    @property
    def state(self) -> JobState:
        return self._state

    def _set_state(self, state: JobState) -> None:
        # A state we set while giving up on the job (cancel unconfirmed) yields to the provider's later word.
        if state == self._state or (self._state.terminal and not self.cancel_pending):
            return
        self._state = state
        self.timestamps.setdefault(state.value, time.time())

    def _succeed(self, output: Output) -> None:
        self.output = output
        self._set_state(JobState.SUCCEEDED)

    def _fail(self, error: BrokerError, state: JobState = JobState.FAILED) -> None:
        self.error = error
        self._set_state(state)

    # -- what subclasses provide ------------------------------------------------
    @abstractmethod
    async def _refresh(self) -> None:
        """Ask the provider once; update state via ``_set_state``/``_succeed``/``_fail``."""

    @abstractmethod
    async def _cancel(self) -> bool | None:
        """Ask the provider once to stop the job. Return True (or None) when the provider confirmed it
        is stopped or finished, False when it accepted the request but the job has not stopped yet;
        raise a ``BrokerError`` when the request itself failed (429, 5xx, timeout): ``cancel`` asks again."""

    # -- the lifecycle -------------------------------------------------------------
    async def poll(self) -> JobState:
        if not self._state.terminal:
            await self._refresh()
        return self._state

    async def wait(self, timeout: float | None = None) -> JobState:
        """Poll until terminal or ``timeout`` seconds pass; returns the state reached."""
        deadline = None if timeout is None else time.monotonic() + timeout
        i = 0
        while not (await self.poll()).terminal:
            delay = self.poll_schedule[min(i, len(self.poll_schedule) - 1)]
            i += 1
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                delay = min(delay, remaining)
            await asyncio.sleep(delay)
        return self._state

    async def result(self, timeout: float | None = None) -> Output:
        """The output; raises the job's typed error, or ``ProviderTimeout`` (the job is left running)."""
        state = await self.wait(timeout)
        if state == JobState.SUCCEEDED and self.output is not None:
            return self.output
        if self.error is not None:
            raise self.error
        if state == JobState.CANCELLED:
            raise JobCancelled(f"job {self.id} on {self.provider} was cancelled")
        raise ProviderTimeout(
            f"job {self.id} on {self.provider} still {state.value} after {timeout:g}s",
            provider=self.provider,
            job_id=self.id,
        )

    async def stream(self) -> AsyncIterator[AudioChunk]:
        """Audio chunks as they are made. Providers without streaming yield the whole result once."""
        out = await self.result()
        if not isinstance(out, Audio):
            raise TypeError("only speech jobs stream audio")
        yield AudioChunk(out, 0, final=True, text=out.text if out.text is not None else _text_of(self.request))

    async def cancel(self, *, patience_s: float | None = None) -> bool:
        """Stop the job; True once the provider confirmed it (or it had finished anyway).

        Idempotent. A refused request (429 with Retry-After, 5xx, timeout) is asked again, for at most
        ``patience_s`` (default ``CANCEL_PATIENCE_S``). Unconfirmed, it returns False with the job still
        in its last known state and ``cancel_pending`` set: the caller keeps it ``cancelling`` in the
        ledger and calls ``cancel`` again later. Past ``expires_at`` the provider has ended it itself."""
        if self._state.terminal and not self.cancel_pending:
            return True
        self.cancel_pending = True
        give_up = time.monotonic() + (CANCEL_PATIENCE_S if patience_s is None else patience_s)
        delay = 0.1
        while True:
            wait = delay
            try:
                confirmed = await self._cancel() is not False
            except BrokerError as exc:
                confirmed = False
                retry_after = getattr(exc, "retry_after", None)
                wait = max(delay, retry_after or 0.0)
            # Only the provider's answer (or its own ttl) ends this: a state we set locally confirms nothing.
            if confirmed or (self.expires_at is not None and time.time() >= self.expires_at):
                break
            if time.monotonic() + wait > give_up:
                return False
            await asyncio.sleep(wait)
            delay = min(delay * 2, CANCEL_BACKOFF_MAX_S)
        self.cancel_pending = False
        if not self._state.terminal:
            self._fail(JobCancelled(f"job {self.id} cancelled"), JobState.CANCELLED)
        return True

    def seconds_in(self, state: JobState) -> float | None:
        """Time spent queued (or running), from the recorded transitions."""
        ts = self.timestamps
        if state == JobState.QUEUED and "queued" in ts:
            end = ts.get("running") or next((ts[s.value] for s in JobState if s.terminal and s.value in ts), None)
            return None if end is None else end - ts["queued"]
        if state == JobState.RUNNING and "running" in ts:
            end = next((ts[s.value] for s in JobState if s.terminal and s.value in ts), None)
            return None if end is None else end - ts["running"]
        return None


class BackgroundJob(Job):
    """A job whose state is pushed by a background task: in-process work, a held HTTP request, a stream.

    Subclasses implement ``_run`` and call ``_start()`` at the end of ``__init__``. Polling only yields to
    the task, ``wait`` awaits it, and cancelling cancels it and lets it unwind.
    """

    _task: asyncio.Task[None] | None = None

    def _start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    @abstractmethod
    async def _run(self) -> None:
        """Do the job, ending in ``_succeed`` or ``_fail``."""

    async def _refresh(self) -> None:
        await asyncio.sleep(0)

    async def wait(self, timeout: float | None = None) -> JobState:
        if not self._state.terminal and self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
        return self._state

    async def _cancel(self) -> bool | None:
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return True


class Provider(ABC):
    """Runs speech and render jobs somewhere. ``CloudGPUManager`` is a Provider too."""

    #: the endpoint's name: routing, health, budgets, reports and the ledger all key on it
    name: str = "provider"
    #: the provider kind ("runpod", "modal", ...): price rows and quirks key on it; several endpoints may share one
    kind: str = "provider"
    capabilities: Capabilities = Capabilities()
    #: jobs this endpoint may run at once (RunPod workers_max, Modal max_containers, Replicate max_instances,
    #: a worker's slots); None = not known, and the caller applies its own default
    max_concurrency: int | None = None
    #: provider-specific knobs the manager reads (queue timeout, hedging eligibility, ...)
    queue_timeout_s: float | None = None
    install_hint: ClassVar[str] = ""

    @abstractmethod
    async def submit(self, request: Request, *, stream: bool = False) -> Job:
        """Hand the job to the provider; returns once it has been accepted."""

    async def health(self) -> HealthReport:
        return HealthReport(ok=True, detail="no health probe")

    def attach(self, job_id: str) -> Job | None:
        """A handle on a job this endpoint accepted earlier, perhaps in a process that died: enough to
        poll, cancel and bill it (``broker reconcile``). None when jobs cannot be looked up by id."""
        return None

    def quote(self, request: Request) -> Any:
        """Expected $ and seconds for ``request`` (a ``broker.types.Quote``), from the price catalog."""
        from broker.money.pricing import quote_for

        return quote_for(self, request)

    async def aclose(self) -> None:
        """Release clients and background work."""

    async def __aenter__(self) -> Provider:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    # -- conveniences over submit + result ----------------------------------------
    async def arun(self, request: Request, *, timeout: float | None = None) -> Output:
        job = await self.submit(request)
        try:
            return await job.result(timeout)
        except BaseException:
            await asyncio.shield(job.cancel())
            raise

    async def agenerate_speech(
        self,
        text: str,
        speaker: int | str = 0,
        context: Sequence[Segment] = (),
        max_length_ms: float | None = None,
        **options: Any,
    ) -> Audio:
        request = build(
            SpeechRequest, text=text, speaker=speaker, context=list(context), max_length_ms=max_length_ms,
            **options,
        )
        out = await self.arun(request)
        assert isinstance(out, Audio)
        return out

    async def arender(
        self,
        audio: Audio | Any | None = None,
        *,
        text: str | None = None,
        avatar: bytes | None = None,
        **options: Any,
    ) -> Video:
        if audio is not None and not isinstance(audio, Audio):
            audio = Audio(audio)
        request = build(RenderRequest, audio=audio, text=text, avatar=avatar, **options)
        out = await self.arun(request)
        assert isinstance(out, Video)
        return out

    async def astream_speech(
        self, text: str, speaker: int | str = 0, context: Sequence[Segment] = (), **options: Any
    ) -> AsyncIterator[AudioChunk]:
        request = build(SpeechRequest, text=text, speaker=speaker, context=list(context), **options)
        job = await self.submit(request, stream=True)
        done = False
        try:
            async for chunk in job.stream():
                yield chunk
            done = True
        finally:
            if not done:
                await asyncio.shield(job.cancel())

    # -- sync twins ------------------------------------------------------------------
    def generate_speech(
        self,
        text: str,
        speaker: int | str = 0,
        context: Sequence[Segment] = (),
        max_length_ms: float | None = None,
        **options: Any,
    ) -> Any:
        return run_sync(self.agenerate_speech(text, speaker, context, max_length_ms, **options))

    def render(self, audio: Audio | Any | None = None, **options: Any) -> Video:
        return run_sync(self.arender(audio, **options))

    def stream_speech(self, text: str, speaker: int | str = 0, **options: Any) -> Iterator[AudioChunk]:
        return iterate_sync(self.astream_speech(text, speaker, **options))

    def run_request(self, request: Request, *, timeout: float | None = None) -> Output:
        """Run an already-built request to completion (sync)."""
        return run_sync(self.arun(request, timeout=timeout))

    def close(self) -> None:
        run_sync(self.aclose())


def _text_of(request: Request | None) -> str | None:
    """The text a job speaks (None for a job re-attached by id, whose request is not known)."""
    return getattr(request, "text", None)
