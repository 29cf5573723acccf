"""`broker bench`: what the same work costs and takes on every provider, side by side.

Two sources of figures, always labelled:

- **estimate**: every row of the price catalog × the performance profiles (``broker/data``), with
  the profile's and the price's source. Needs no account. The local engine is measured live on this
  machine (a few short jobs) unless asked not to.
- **live**: short calibration jobs (speech and render, cold then warm) on each configured provider,
  split into queue + cold start + run from the provider's own metrics (see ``broker.bench_measure``),
  priced with the catalog, and extrapolated to the requested workloads with the measured speed.

Workloads are N words of speech (default 500 / 2,000 / 10,000) and N seconds of talking-head video
rendered from audio you already have (default 10 / 60). ``volume`` projects a month of N jobs per
workload, idle tails and keep-warm workers included where the provider bills them.
"""

from __future__ import annotations

import math
import os
import platform
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from broker.bench_measure import Calibration, TaskSpeed, calibrate, planned_jobs
from broker.errors import BrokerError, InvalidRequest
from broker.pricing import Catalog, PriceRow
from broker.types import estimate_speech_seconds

if TYPE_CHECKING:
    from broker.ledger import Ledger
    from broker.providers.base import Provider
    from broker.settings import Settings

DEFAULT_WORDS = (500, 2000, 10_000)
DEFAULT_RENDER_SECONDS = (10.0, 60.0)
#: the frame rate renders are made at (RenderRequest's default)
RENDER_FPS = 25.0
MONTH_S = 30 * 86_400.0
#: provider settings that keep workers warm / stop them, by provider (read with getattr; data, not code paths)
KEEP_WARM_SETTINGS: dict[str, tuple[str, str | None]] = {
    "runpod": ("workers_min", "idle_timeout_s"),
    "modal": ("min_containers", "scaledown_window_s"),
    "replicate": ("min_instances", None),
}

#: ``progress(done, total, description)``
Progress = Callable[[int, int, str], None]


# -- workloads ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    task: str  # "speech" | "render"
    #: words of text (speech) or seconds of video (render)
    amount: float

    @property
    def label(self) -> str:
        if self.task == "speech":
            return f"{int(self.amount):,} words"
        return f"{self.amount:g} s render"

    def output_seconds(self, seconds_per_word: float) -> float:
        return self.amount * seconds_per_word if self.task == "speech" else self.amount


def parse_amounts(text: str | None, option: str, *, integer: bool) -> tuple[float, ...]:
    """``"500,2000"`` → (500, 2000). Empty or ``none`` → (): that task is left out."""
    if text is None or text.strip().lower() in ("", "none", "0"):
        return ()
    values: list[float] = []
    for part in text.split(","):
        part = part.strip().replace("_", "")
        try:
            value = float(part)
        except ValueError:
            raise InvalidRequest(option, f"{part!r} is not a number (give a comma-separated list, e.g. 500,2000)") \
                from None
        if not math.isfinite(value) or value <= 0:
            raise InvalidRequest(option, f"{part!r} must be a positive number")
        if integer and value != int(value):
            raise InvalidRequest(option, f"{part!r} must be a whole number")
        values.append(float(int(value)) if integer else value)
    return tuple(dict.fromkeys(values))


def make_workloads(words: Sequence[float], render_seconds: Sequence[float]) -> list[Workload]:
    return [Workload("speech", w) for w in words] + [Workload("render", s) for s in render_seconds]


# -- results --------------------------------------------------------------------------------------
@dataclass
class Figure:
    """A number and where it came from."""

    value: float
    basis: str
    source: str


@dataclass
class BenchRow:
    """One provider/hardware doing one workload."""

    provider: str
    hardware: str
    task: str
    workload: str
    amount: float
    output_s: float
    #: True when the times come from jobs run in this bench (not from profiles)
    measured: bool
    #: a job sent to an idle provider: queue + cold start + run + API overhead
    wall_s: float
    #: the same job on a warm worker
    warm_wall_s: float
    queue_s: float
    cold_start_s: float
    run_s: float
    overhead_s: float
    #: dollars for one job from cold (cold start and idle tail included where billed); None: no price row
    usd: float | None
    usd_warm: float | None
    usd_per_output_min: float | None
    #: local's wall time ÷ this row's (>1: faster than this machine)
    speedup_vs_local: float | None = None
    #: share of local's $ this row saves (needs a priced local; negative: costs more)
    saving_vs_local: float | None = None
    speed_basis: str = "estimate"
    speed_source: str = ""
    cold_basis: str = "estimate"
    cold_source: str = ""
    price_basis: str = ""
    price_source: str = ""
    price_checked: str = ""
    billing_model: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str]:
        return self.provider, self.hardware


@dataclass
class MonthlyRow:
    provider: str
    hardware: str
    workload: str
    measured: bool
    jobs: int
    usd: float | None
    #: the part of ``usd`` paid for idle tails, cold starts and keep-warm workers
    usd_idle: float | None
    cold_share: float
    compute_hours: float
    model: str


@dataclass
class BenchResult:
    mode: str
    engine: str
    workloads: list[Workload]
    rows: list[BenchRow]
    seconds_per_word: Figure
    calibrations: list[Calibration] = field(default_factory=list)
    monthly: list[MonthlyRow] = field(default_factory=list)
    volume: int | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    started_at: float = 0.0
    seconds: float = 0.0

    @property
    def calibration_cost_usd(self) -> float:
        return sum(c.cost_usd for c in self.calibrations)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "mode": self.mode,
            "engine": self.engine,
            "machine": self.machine,
            "started_at": self.started_at,
            "seconds": round(self.seconds, 3),
            "seconds_per_word": asdict(self.seconds_per_word),
            "workloads": [{"task": w.task, "amount": w.amount, "label": w.label,
                           "output_s": round(w.output_seconds(self.seconds_per_word.value), 3)}
                          for w in self.workloads],
            "rows": [row_dict(r) for r in self.rows],
            "volume": self.volume,
            "monthly": [asdict(m) for m in self.monthly],
            "calibrations": [asdict(c) for c in self.calibrations],
            "calibration_cost_usd": round(self.calibration_cost_usd, 8),
            "skipped": [{"provider": k, "reason": v} for k, v in self.skipped.items()],
        }


def row_dict(row: BenchRow) -> dict[str, Any]:
    out = asdict(row)
    for k, v in out.items():
        if isinstance(v, float):
            out[k] = round(v, 8 if k.startswith(("usd", "saving")) else 4)
    return out


# -- speed: from the catalog, or measured ------------------------------------------------------------
def estimated_speed(catalog: Catalog, row: PriceRow, task: str, engine: str) -> TaskSpeed:
    """A task's speed on ``row``'s hardware from the performance profiles (k = compute s per output s)."""
    cold_src = f"catalog: typical cold start of {row.provider} ({row.source or 'no source'})"
    if task == "speech":
        prof = catalog.profile(engine, row.profile)
        if prof is None:
            return TaskSpeed(k=1.0, cold_start_s=row.cold_start_s, cold_source=cold_src,
                             source=f"no {engine} profile for {row.profile}: assumed real time")
        return TaskSpeed(k=prof.value, cold_start_s=row.cold_start_s, basis=prof.basis, cold_source=cold_src,
                         source=f"{engine} on {prof.hardware}: rtf {prof.value:g} ({prof.source})")
    prof = catalog.profile("render", row.profile)
    fps = prof.value if prof is not None else RENDER_FPS
    return TaskSpeed(k=RENDER_FPS / fps, cold_start_s=row.cold_start_s, basis=prof.basis if prof else "estimate",
                     source=(f"render on {prof.hardware}: {fps:g} fps ({prof.source})" if prof
                             else "no render profile: assumed real time"), cold_source=cold_src)


def measured_speeds(cal: Calibration, catalog: Catalog, row: PriceRow | None, engine: str) -> dict[str, TaskSpeed]:
    """The calibration's speeds, with catalog figures standing in (and saying so) where it measured nothing."""
    speeds: dict[str, TaskSpeed] = {}
    for task in ("speech", "render"):
        got = cal.speeds.get(task)
        if got is None:
            if row is None:
                continue
            fallback = estimated_speed(catalog, row, task, engine)
            fallback.notes.append(f"{task} not measured ({cal.errors.get(task, 'not run')}); profile figure")
            speeds[task] = fallback
            continue
        speed = TaskSpeed(**{**asdict(got), "notes": list(got.notes)})
        if row is not None and row.scales_to_zero and speed.cold_start_s < _unseen_cold_start(row):
            # The first job found a worker already up (someone used the endpoint recently, or an
            # emulator keeps one running): its cold start was not seen, so the catalog's stands in.
            speed.notes.append(f"first job found a warm worker (cold start {speed.cold_start_s:.1f} s measured); "
                               f"catalog cold start used")
            speed.cold_start_s, speed.cold_basis = row.cold_start_s, "estimate"
            speed.cold_source = f"catalog: typical cold start of {row.provider} ({row.source or 'no source'})"
        speeds[task] = speed
    if "speech" in speeds and "render" in speeds and "speech" in cal.speeds and "render" in cal.speeds \
            and row is not None and row.scales_to_zero and speeds["render"].cold_basis == "measured":
        # A render from zero boots the worker (seen by the speech job) and then loads the renderer.
        speeds["render"].cold_start_s += speeds["speech"].cold_start_s
    return speeds


def _unseen_cold_start(row: PriceRow) -> float:
    """Below this, a measured cold start on a scale-to-zero provider means the worker was already warm."""
    return min(0.5, 0.1 * row.cold_start_s)


# -- projection -------------------------------------------------------------------------------------
def project(provider: str, hardware: str, speed: TaskSpeed, row: PriceRow | None, workload: Workload,
            seconds_per_word: float, *, measured: bool, idle_s: float | None = None) -> BenchRow:
    """One workload on one provider: times from ``speed``, dollars from ``row``."""
    output_s = workload.output_seconds(seconds_per_word)
    run = speed.run_seconds(output_s)
    warm = speed.queue_s + speed.overhead_s + run
    cold = speed.cold_start_s
    usd = usd_warm = per_min = None
    if row is not None:
        usd = row.cost(row.billable_seconds(run, cold, idle_s))
        usd_warm = row.cost(row.billable_seconds(run, 0.0, idle_s))
        per_min = usd / (output_s / 60.0) if output_s > 0 else None
    return BenchRow(
        provider=provider, hardware=hardware, task=workload.task, workload=workload.label, amount=workload.amount,
        output_s=output_s, measured=measured, wall_s=warm + cold, warm_wall_s=warm, queue_s=speed.queue_s,
        cold_start_s=cold, run_s=run, overhead_s=speed.overhead_s, usd=usd, usd_warm=usd_warm,
        usd_per_output_min=per_min, speed_basis=speed.basis, speed_source=speed.source,
        cold_basis=speed.cold_basis, cold_source=speed.cold_source,
        price_basis=row.basis if row else "unpriced", price_source=row.source if row else "",
        price_checked=row.checked if row else "", billing_model=row.billing_model if row else "",
        notes=list(speed.notes),
    )


def compare_to_local(rows: list[BenchRow], local_hardware: str | None) -> None:
    """Fill ``speedup_vs_local`` and ``saving_vs_local`` against this machine's row of each workload."""
    for workload in {r.workload for r in rows}:
        same = [r for r in rows if r.workload == workload]
        local = [r for r in same if r.provider == "local" and (local_hardware is None or r.hardware == local_hardware)]
        if not local:
            continue
        base = max(local, key=lambda r: r.measured)  # the measured one when there is one
        for r in same:
            if r.wall_s > 0:
                r.speedup_vs_local = base.wall_s / r.wall_s
            if base.usd and r.usd is not None:
                r.saving_vs_local = (base.usd - r.usd) / base.usd


def monthly(row: BenchRow, price: PriceRow | None, jobs: int, *, min_workers: int = 0,
            idle_s: float | None = None) -> MonthlyRow:
    """A month of ``jobs`` of this workload, arriving at random (Poisson), on one worker at a time.

    Serverless: each job pays its run; a job arriving while the previous one's worker is still up
    (within run + idle window) starts warm, else it pays a cold start (P = e^(−λ·(run + idle))); the
    idle tail billed after each job is E[min(gap, idle)] = (1 − e^(−λ·idle)) / λ. With min workers
    kept warm, those workers are billed all month and jobs pay no cold start or tail.
    """
    hours = jobs * row.run_s / 3600

    def month(usd: float | None, idle: float | None, cold_share: float, compute_h: float, model: str) -> MonthlyRow:
        return MonthlyRow(row.provider, row.hardware, row.workload, row.measured, jobs, usd, idle, cold_share,
                          compute_h, model)

    if price is None:
        return month(None, None, 0.0, hours, "unpriced")
    rate = price.usd_per_second
    if min_workers > 0:
        always = min_workers * MONTH_S * rate
        busy_s = jobs * row.run_s
        overflow = max(0.0, busy_s - min_workers * MONTH_S) * rate
        idle_usd = max(0.0, always - min(busy_s, min_workers * MONTH_S) * rate)
        return month(always + overflow, idle_usd, 0.0, hours, f"{min_workers} worker(s) kept warm all month")
    window = price.idle_s if idle_s is None else idle_s
    if price.scales_to_zero or (price.bills_idle and window > 0):
        lam = jobs / MONTH_S
        p_cold = math.exp(-lam * (row.run_s + window)) if row.cold_start_s > 0 else 0.0
        tail = (1 - math.exp(-lam * window)) / lam if lam > 0 and window > 0 else 0.0
        extra_s = (p_cold * row.cold_start_s if price.bills_cold_start else 0.0) + (tail if price.bills_idle else 0.0)
        return month(jobs * rate * (row.run_s + extra_s), jobs * rate * extra_s, p_cold,
                     hours + jobs * p_cold * row.cold_start_s / 3600, f"scale to zero, idle window {window:g} s")
    return month(jobs * price.cost(row.run_s), 0.0, 0.0, hours, "billed per job's run time")


def keep_warm(settings: Settings, provider: str) -> tuple[int, float | None]:
    """(workers kept warm, idle timeout) the configuration asks of ``provider`` (0, None when it says nothing)."""
    names = KEEP_WARM_SETTINGS.get(provider)
    section = getattr(settings, provider, None)
    if names is None or section is None:
        return 0, None
    min_name, idle_name = names
    idle = getattr(section, idle_name) if idle_name else None
    return int(getattr(section, min_name, 0) or 0), float(idle) if idle is not None else None


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class BenchOptions:
    estimate: bool = True
    live: bool = False
    #: provider names to include (both modes); None = all
    providers: Sequence[str] | None = None
    #: estimate mode: only catalog rows with one of these hardware names (any alias); None = all
    hardware: Sequence[str] | None = None
    words: Sequence[float] = DEFAULT_WORDS
    render_seconds: Sequence[float] = DEFAULT_RENDER_SECONDS
    volume: int | None = None
    engine: str | None = None
    #: estimate mode: measure the local engine on this machine
    measure_local: bool = True
    warm_runs: int = 2
    timeout_s: float = 600.0
    render_size: int = 512
    local_usd_per_hour: float | None = None


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average": load, "platform": platform.platform(terse=True),
            "python": platform.python_version()}


def _priced_catalog(catalog: Catalog, local_usd_per_hour: float | None) -> Catalog:
    if local_usd_per_hour is None:
        return catalog
    if local_usd_per_hour < 0:
        raise InvalidRequest("local_usd_per_hour", "must be >= 0")
    rows = [PriceRow(provider="local", hardware=r.hardware, profile=r.profile, usd_per_second=local_usd_per_hour / 3600,
                     min_billed_s=0.0, cold_start_s=0.0, idle_s=0.0, bills_cold_start=False, bills_idle=False,
                     basis="config", billing_model=f"this machine at ${local_usd_per_hour:g}/h (--local-usd-per-hour)")
            for r in catalog.prices() if r.provider == "local"]
    return catalog.with_prices(rows)


def _hw_key(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-")  # the catalog's spelling of hardware names


def _wanted(name: str, options: BenchOptions) -> bool:
    return options.providers is None or name in options.providers


def _live_providers(options: BenchOptions, settings: Settings, skipped: dict[str, str]) -> list[Provider]:
    from broker.providers import registry

    names = list(options.providers) if options.providers is not None else registry.names()
    found: list[Provider] = []
    for name in names:
        if name == "local" and not settings.local.enabled:
            skipped[name] = "disabled (local.enabled = false)"
            continue
        try:
            found.append(registry.create(name, settings))
        except BrokerError as exc:
            skipped[name] = exc.message
    return found


async def abench(
    options: BenchOptions | None = None,
    *,
    settings: Settings | None = None,
    catalog: Catalog | None = None,
    providers: Sequence[Provider] = (),
    ledger: Ledger | None = None,
    progress: Progress | None = None,
) -> BenchResult:
    """Run the bench. ``providers`` are measured live as given (besides those built from settings in live mode)."""
    from broker.settings import Settings

    options = options or BenchOptions()
    if options.warm_runs < 1:
        raise InvalidRequest("warm_runs", "needs at least one warm job to separate cold start from run time")
    settings = settings or Settings()
    catalog = _priced_catalog(catalog or Catalog.from_settings(settings), options.local_usd_per_hour)
    engine = options.engine or settings.engines.default
    workloads = make_workloads(options.words, options.render_seconds)
    if not workloads:
        raise InvalidRequest("words", "nothing to bench: give --words and/or --render-seconds")
    tasks = sorted({w.task for w in workloads}, key=("speech", "render").index)
    started, t0 = time.time(), time.perf_counter()
    skipped: dict[str, str] = {}

    given = list(providers)
    built: list[Provider] = []
    if options.live:
        built = _live_providers(options, settings, skipped)
    elif options.estimate and options.measure_local and _wanted("local", options):
        built = _live_providers(BenchOptions(providers=["local"]), settings, skipped)
    names = {p.name for p in given}
    to_measure = given + [p for p in built if p.name not in names]
    for p in built:
        if p.name in names:
            await p.aclose()
    # Speech is measured even when only renders are benched: it calibrates the audio the renders animate.
    measure_tasks = ["speech", "render"] if "render" in tasks else ["speech"]
    total = planned_jobs(measure_tasks, options.warm_runs) * len(to_measure)
    done = 0

    def on_job(what: str) -> None:
        nonlocal done
        if progress is not None:
            progress(done, total, what)
        done += 1

    run_id = f"bench-{uuid.uuid4().hex[:12]}"
    calibrations: list[Calibration] = []
    for p in to_measure:
        record = _ledger_writer(ledger, run_id, p) if ledger is not None and options.live else None
        try:
            cal = await calibrate(p, tasks=measure_tasks, engine=options.engine, warm_runs=options.warm_runs,
                                  timeout_s=options.timeout_s, render_size=options.render_size, on_job=on_job,
                                  on_timing=record)
        finally:
            if p not in given:  # what we built we close; what the caller gave stays theirs
                await p.aclose()
        calibrations.append(cal)
    if progress is not None:
        progress(total, total, "projecting")

    spw = _speaking_pace(calibrations)
    rows: list[BenchRow] = []
    local_hw: str | None = None
    fallbacks: set[tuple[str, str, str]] = set()
    for cal in calibrations:
        row = catalog.price(cal.provider, cal.hardware)
        hardware = row.hardware[0] if row is not None else cal.hardware  # the catalog's spelling, to line up
        _, idle = keep_warm(settings, cal.provider)
        if cal.provider == "local":
            local_hw = hardware
        for task, speed in measured_speeds(cal, catalog, row, engine).items():
            if speed.basis != "measured":
                fallbacks.add((cal.provider, hardware, task))
            for w in workloads:
                if w.task == task:
                    rows.append(project(cal.provider, hardware, speed, row, w, spw.value,
                                        measured=speed.basis == "measured", idle_s=idle))
    if options.estimate:
        wanted_hw = {_hw_key(h) for h in options.hardware} if options.hardware else None
        for price in catalog.prices():
            if not _wanted(price.provider, options) or (wanted_hw is not None and wanted_hw.isdisjoint(price.hardware)):
                continue
            _, idle = keep_warm(settings, price.provider)
            for task in tasks:
                if (price.provider, price.hardware[0], task) in fallbacks:
                    continue  # already there, estimated, with the note saying why it was not measured
                speed = estimated_speed(catalog, price, task, engine)
                for w in workloads:
                    if w.task == task:
                        rows.append(project(price.provider, price.hardware[0], speed, price, w, spw.value,
                                            measured=False, idle_s=idle))
    compare_to_local(rows, local_hw or "cpu")
    order = {w.label: i for i, w in enumerate(workloads)}
    rows.sort(key=lambda r: (order[r.workload], r.usd is None, r.usd or 0.0, r.wall_s))

    month: list[MonthlyRow] = []
    if options.volume:
        for r in rows:
            n_warm, idle = keep_warm(settings, r.provider)
            month.append(monthly(r, catalog.price(r.provider, r.hardware), options.volume, min_workers=n_warm,
                                 idle_s=idle))
    mode = "+".join(m for m, on in (("live", options.live), ("estimate", options.estimate)) if on) or "estimate"
    return BenchResult(mode=mode, engine=engine, workloads=workloads, rows=rows, seconds_per_word=spw,
                       calibrations=calibrations, monthly=month, volume=options.volume, skipped=skipped,
                       machine=machine_info(), started_at=started, seconds=time.perf_counter() - t0)


def _speaking_pace(calibrations: Sequence[Calibration]) -> Figure:
    """Seconds of audio per word: measured where any speech job ran (local first), else ~150 words/min."""
    for cal in sorted(calibrations, key=lambda c: c.provider != "local"):
        spw = cal.seconds_per_word()
        if spw:
            return Figure(spw, "measured", f"the {cal.provider} calibration's speech ({60 / spw:.0f} words/min)")
    return Figure(estimate_speech_seconds("w " * 1000) / 1000, "estimate", "~150 words a minute (audiobook pace)")


def _ledger_writer(ledger: Ledger, run_id: str, provider: Provider) -> Callable[[Any], None]:
    """Record each calibration job in the ledger: live calibration spends real money."""

    def record(t: Any) -> None:
        ledger.record_attempt(
            run_id, provider.name, "succeeded" if t.ok else "failed", hardware=provider.capabilities.hardware,
            task=t.task, started_at=t.started_at, ended_at=t.ended_at, provider_job_id=t.provider_job_id,
            billed_seconds=t.billed_s, cost_usd=t.cost_usd or 0.0, cost_estimated=t.cost_estimated,
            error_class=t.error_class, message=t.error,
        )

    return record


def bench(options: BenchOptions | None = None, **kwargs: Any) -> BenchResult:
    """Sync twin of ``abench``."""
    from broker._sync import run_sync

    return run_sync(abench(options, **kwargs))


__all__ = ["BenchOptions", "BenchResult", "BenchRow", "MonthlyRow", "Workload", "abench", "bench",
           "compare_to_local", "estimated_speed", "keep_warm", "make_workloads", "measured_speeds", "monthly",
           "parse_amounts", "project"]
