"""The arithmetic of `broker bench`: speeds (from the catalog or measured), workloads projected onto them
(time and $ per job), comparison with this machine, and a month of jobs with idle tails and keep-warm workers.

No I/O here: ``broker.bench.run`` runs the calibration jobs and ``broker.bench.report`` shows the results.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from broker.bench.measure import Calibration, TaskSpeed
from broker.money.pricing import Catalog, PriceRow

if TYPE_CHECKING:
    from broker.settings import Settings

#: the frame rate renders are made at (RenderRequest's default)
RENDER_FPS = 25.0
MONTH_S = 30 * 86_400.0
#: provider settings that keep workers warm / stop them, by provider (read with getattr; data, not code paths)
KEEP_WARM_SETTINGS: dict[str, tuple[str, str | None]] = {
    "runpod": ("workers_min", "idle_timeout_s"),
    "modal": ("min_containers", "scaledown_window_s"),
    "replicate": ("min_instances", None),
    # self-hosted machines are rented by the hour and stay up: each one bills 24 h a day
    "http": ("always_on_machines", None),
}


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
    """(workers kept warm, idle timeout) the configuration asks of endpoint (or kind) ``provider``
    (0, None when it says nothing)."""
    kind, section = settings.endpoint_configs().get(provider, (provider, getattr(settings, provider, None)))
    names = KEEP_WARM_SETTINGS.get(kind)
    if names is None or section is None:
        return 0, None
    min_name, idle_name = names
    idle = getattr(section, idle_name) if idle_name else None
    return int(getattr(section, min_name, 0) or 0), float(idle) if idle is not None else None


__all__ = ["KEEP_WARM_SETTINGS", "MONTH_S", "RENDER_FPS", "BenchRow", "MonthlyRow", "Workload", "compare_to_local",
           "estimated_speed", "keep_warm", "measured_speeds", "monthly", "project", "row_dict"]
