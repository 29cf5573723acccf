"""Calibration for `broker bench`: a few short real jobs on one provider, timed phase by phase.

Each task (speech, render) runs one job on a provider that has not run that task in this
session ("cold") and ``warm_runs`` more ("warm"), of two lengths so a line can be fitted:
``run = fixed + k × output seconds`` (k is the real-time factor for speech; for renders it is
video fps ÷ render fps). Queue and run come from the provider's own metrics where the adapter
reports them on ``Job.billing`` (RunPod ``delayTime``/``executionTime``, Replicate setup and
``metrics.predict_time``, our worker's ``run_s``), else from the job's state timestamps, else
from the wall clock; every job says which. Cold start is what the first job took beyond what a
warm job of the same length takes.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from broker.errors import BrokerError
from broker.media import SAMPLE_RATE, Audio, Video
from broker.providers.base import Job, JobState, Provider
from broker.types import RenderRequest, SpeechRequest

#: calibration texts: short enough to cost a fraction of a cent, long enough to time (~20 and ~45 words)
SHORT_TEXT = "The quick brown fox jumps over the lazy dog. It was not amused, and said so to anyone who would listen."
LONG_TEXT = (
    "Every chapter of this book was read aloud by a machine, one sentence at a time. The reader never tires, "
    "never coughs, and never asks for a break, but it still takes time to speak, and time on a rented "
    "graphics card is money."
)
#: seconds of audio the render calibration jobs animate (short, long)
RENDER_CLIPS_S = (2.0, 6.0)
#: a first job this much slower than a warm one counts as a measured cold start
MIN_COLD_PENALTY_S = 0.5

#: ``on_job(description)``: called before each calibration job (drives the progress bar)
OnJob = Callable[[str], None]


@dataclass
class JobTiming:
    """One calibration job, phase by phase."""

    task: str
    cold: bool
    ok: bool
    wall_s: float
    queue_s: float = 0.0
    run_s: float = 0.0
    #: wall time outside queue and run: API round trips, status-poll lag, output transfer
    overhead_s: float = 0.0
    #: seconds of audio (speech) or video (render) produced
    output_s: float = 0.0
    words: int = 0
    frames: int = 0
    #: "provider metrics" | "job timestamps" | "wall clock": where queue/run came from
    timing_source: str = "wall clock"
    billed_s: float | None = None
    cost_usd: float | None = None
    cost_estimated: bool = True
    provider_job_id: str | None = None
    error: str | None = None
    error_class: str | None = None
    started_at: float = 0.0
    ended_at: float = 0.0


@dataclass
class TaskSpeed:
    """How one provider runs one task: ``run = fixed_s + k × output seconds``, plus queue, overhead, cold start."""

    k: float
    fixed_s: float = 0.0
    queue_s: float = 0.0
    overhead_s: float = 0.0
    cold_start_s: float = 0.0
    #: "measured" | "published" | "estimate" | "config" for the speed figure, and where it came from
    basis: str = "estimate"
    source: str = ""
    cold_basis: str = "estimate"
    cold_source: str = ""
    notes: list[str] = field(default_factory=list)

    def run_seconds(self, output_s: float) -> float:
        return self.fixed_s + self.k * output_s


@dataclass
class Calibration:
    #: the endpoint's name (rows and the ledger use it)
    provider: str
    hardware: str
    jobs: list[JobTiming] = field(default_factory=list)
    speeds: dict[str, TaskSpeed] = field(default_factory=dict)
    #: task → why it could not be measured
    errors: dict[str, str] = field(default_factory=dict)
    #: the provider kind: price rows key on it (several endpoints may share one); "" = same as provider
    kind: str = ""

    @property
    def price_kind(self) -> str:
        return self.kind or self.provider

    @property
    def cost_usd(self) -> float:
        return sum(j.cost_usd or 0.0 for j in self.jobs)

    def seconds_per_word(self) -> float | None:
        """The engine's own speaking pace, from the speech jobs that succeeded."""
        done = [j for j in self.jobs if j.ok and j.task == "speech" and j.words > 0 and j.output_s > 0]
        words = sum(j.words for j in done)
        return sum(j.output_s for j in done) / words if words else None


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(slope, intercept) of run seconds against output seconds.

    Least squares when the points span at least two lengths and the line is plausible: a
    non-negative fixed cost, and a slope at least half the average rate (two short jobs a tenth of
    a second apart on a busy machine can otherwise "prove" that a long job is free). Else a line
    through the origin (total run ÷ total output), which errs on the slow side for long workloads.
    """
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    if not points or sum(xs) <= 0:
        raise ValueError("no output to fit")
    average = sum(ys) / sum(xs)
    if len({round(x, 3) for x in xs}) >= 2:
        slope, intercept = np.polyfit(np.asarray(xs), np.asarray(ys), 1)
        if slope >= 0.5 * average and intercept >= 0:
            return float(slope), float(intercept)
    return average, 0.0


def timing_of(job: Job, wall_s: float) -> tuple[float, float, str]:
    """(queue seconds, run seconds, where they came from) for a finished job."""
    bill = job.billing
    if bill is not None and bill.run_seconds is not None:
        run = max(0.0, bill.run_seconds)
        if bill.queue_seconds is not None:
            return max(0.0, bill.queue_seconds), run, "provider metrics"
        queued = job.seconds_in(JobState.QUEUED)
        if queued is not None:
            return max(0.0, queued), run, "provider metrics + job timestamps"
        return max(0.0, wall_s - run), run, "provider metrics + wall clock"
    queued, running = job.seconds_in(JobState.QUEUED), job.seconds_in(JobState.RUNNING)
    if queued is not None and running is not None:
        return max(0.0, queued), max(0.0, running), "job timestamps"
    return 0.0, wall_s, "wall clock"


async def timed_job(provider: Provider, request: SpeechRequest | RenderRequest, *, cold: bool,
                    timeout_s: float) -> tuple[JobTiming, Audio | Video | None]:
    """Submit ``request``, wait for it, and take it apart into queue / run / overhead."""
    started_at = time.time()
    t0 = time.perf_counter()
    job: Job | None = None
    words = len(request.text.split()) if isinstance(request, SpeechRequest) else 0
    try:
        job = await provider.submit(request)
        out = await job.result(timeout=timeout_s)
    except asyncio.CancelledError:  # Ctrl-C: a job left running on a cloud would go on billing
        if job is not None and not job.state.terminal:
            await asyncio.shield(job.cancel())
        raise
    except Exception as exc:  # a provider's failure is a finding, not a crash of the bench
        if job is not None and not job.state.terminal:
            await asyncio.shield(job.cancel())
        message = exc.message if isinstance(exc, BrokerError) else str(exc)
        timing = JobTiming(task=request.task, cold=cold, ok=False, wall_s=time.perf_counter() - t0, words=words,
                           error=f"{type(exc).__name__}: {message}", error_class=type(exc).__name__,
                           provider_job_id=job.id if job is not None else None, started_at=started_at,
                           ended_at=time.time())
        _bill_into(timing, job, provider)
        return timing, None
    wall = time.perf_counter() - t0
    queue, run, source = timing_of(job, wall)
    timing = JobTiming(
        task=request.task, cold=cold, ok=True, wall_s=wall, queue_s=queue, run_s=run,
        overhead_s=max(0.0, wall - queue - run), output_s=out.duration_s, words=words,
        frames=out.frames if isinstance(out, Video) else 0, timing_source=source, provider_job_id=job.id,
        started_at=started_at, ended_at=time.time(),
    )
    _bill_into(timing, job, provider)
    return timing, out


def _bill_into(timing: JobTiming, job: Job | None, provider: Provider) -> None:
    """The seconds the provider reported, priced by the catalog (providers report seconds, not dollars)."""
    from broker.money.pricing import default_catalog

    bill = job.billing if job is not None else None
    if bill is not None:
        timing.billed_s, timing.cost_usd = default_catalog().settle(provider.name, provider.capabilities.hardware, bill)
        timing.cost_estimated = bill.estimated


def speed_from(jobs: Sequence[JobTiming]) -> TaskSpeed:
    """The task's speed from its cold job and warm jobs (all successful)."""
    warm = [j for j in jobs if not j.cold] or list(jobs)
    k, fixed = fit_line([(j.output_s, j.run_s) for j in warm])
    queue = statistics.median(j.queue_s for j in warm)
    overhead = statistics.median(j.overhead_s for j in warm)
    speed = TaskSpeed(k=k, fixed_s=fixed, queue_s=queue, overhead_s=overhead, basis="measured",
                      source=f"measured live: {len(jobs)} job(s), queue/run from "
                             f"{', '.join(sorted({j.timing_source for j in jobs}))}")
    cold = next((j for j in jobs if j.cold), None)
    if cold is not None and any(not j.cold for j in jobs):
        # What the first job took beyond a warm job of its length: worker boot, model load, image pull,
        # wherever it landed (RunPod: in the queue; Replicate: setup; local: loading the voice at submit).
        expected = queue + overhead + speed.run_seconds(cold.output_s)
        speed.cold_start_s = max(0.0, cold.wall_s - expected)
        speed.cold_basis = "measured"
        speed.cold_source = "first job minus a warm job of the same length"
    return speed


def _clip(audio: Audio | None, seconds: float) -> Audio:
    """``seconds`` of the calibration speech (looped if short), or a voiced tone when there is none."""
    n = int(seconds * SAMPLE_RATE)
    if audio is not None and len(audio) > 0:
        samples = audio.resampled(SAMPLE_RATE).samples
        reps = int(np.ceil(n / len(samples)))
        return Audio(np.tile(samples, reps)[:n], SAMPLE_RATE)
    t = np.arange(n, dtype=np.float32) / SAMPLE_RATE
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)  # syllable-rate loudness so a mouth has something to do
    return Audio((0.3 * envelope * np.sin(2 * np.pi * 180.0 * t)).astype(np.float32), SAMPLE_RATE)


async def calibrate(
    provider: Provider,
    *,
    tasks: Sequence[str] = ("speech", "render"),
    engine: str | None = None,
    warm_runs: int = 2,
    timeout_s: float = 600.0,
    render_size: int = 512,
    on_job: OnJob | None = None,
    on_timing: Callable[[JobTiming], Any] | None = None,
) -> Calibration:
    """Run the calibration jobs of ``tasks`` on ``provider`` (one at a time, so they do not disturb each other)."""
    cal = Calibration(provider=provider.name, hardware=provider.capabilities.hardware, kind=provider.kind)
    runs = 1 + max(0, warm_runs)
    speech_out: Audio | None = None
    for task in ("speech", "render"):
        if task not in tasks:
            continue
        probe = (SpeechRequest(text="x", engine=engine) if task == "speech"
                 else RenderRequest(audio=_clip(None, 0.5), engine=engine))
        why = provider.capabilities.supports(probe)
        if why is not None:
            cal.errors[task] = f"the provider {why}"
            _skip(on_job, provider.name, task, runs)
            continue
        done: list[JobTiming] = []
        for i in range(runs):
            # cold: the short one; warm: long, short, long, ... (two lengths to fit a line through)
            longer = i % 2 == 1
            request: SpeechRequest | RenderRequest = (
                SpeechRequest(text=LONG_TEXT if longer else SHORT_TEXT, engine=engine) if task == "speech"
                else RenderRequest(audio=_clip(speech_out, RENDER_CLIPS_S[1] if longer else RENDER_CLIPS_S[0]),
                                   size=render_size, engine=engine))
            if on_job is not None:
                on_job(f"{provider.name}: {task} ({'cold' if i == 0 else 'warm'})")
            timing, out = await timed_job(provider, request, cold=i == 0, timeout_s=timeout_s)
            cal.jobs.append(timing)
            if on_timing is not None:
                on_timing(timing)
            if not timing.ok:
                cal.errors[task] = timing.error or "failed"
                _skip(on_job, provider.name, task, runs - i - 1)
                break
            done.append(timing)
            if isinstance(out, Audio) and speech_out is None:
                speech_out = out
        if task not in cal.errors:
            speed = cal.speeds[task] = speed_from(done)
            speed.source = f"{provider.name} {cal.hardware}: {speed.source}"
    return cal


def _skip(on_job: OnJob | None, name: str, task: str, count: int) -> None:
    # Keep the progress bar's count honest for the jobs that will not run.
    if on_job is not None:
        for _ in range(count):
            on_job(f"{name}: {task} (skipped)")


def planned_jobs(tasks: Sequence[str], warm_runs: int) -> int:
    """How many calibration jobs ``calibrate`` runs on one provider (for the progress bar)."""
    return len(tasks) * (1 + max(0, warm_runs))


__all__ = ["Calibration", "JobTiming", "TaskSpeed", "calibrate", "fit_line", "planned_jobs", "speed_from",
           "timed_job", "timing_of"]
