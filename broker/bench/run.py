"""`broker bench`: what the same work costs and takes on every provider, side by side.

Two sources of figures, always labelled:

- **estimate**: every row of the price catalog × the performance profiles (``broker/data``), with
  the profile's and the price's source. Needs no account. The local engine is measured live on this
  machine (a few short jobs) unless asked not to.
- **live**: short calibration jobs (speech and render, cold then warm) on each configured provider,
  split into queue + cold start + run from the provider's own metrics (see ``broker.bench.measure``),
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

from broker.bench.measure import Calibration, calibrate, planned_jobs
from broker.bench.model import (
    BenchRow,
    MonthlyRow,
    Workload,
    compare_to_local,
    estimated_speed,
    keep_warm,
    measured_speeds,
    monthly,
    project,
    row_dict,
)
from broker.errors import InvalidRequest
from broker.money.pricing import Catalog, PriceRow
from broker.types import estimate_speech_seconds

if TYPE_CHECKING:
    from broker.providers.base import Provider
    from broker.settings import Settings
    from broker.store.base import LedgerStore as Ledger

DEFAULT_WORDS = (500, 2000, 10_000)
DEFAULT_RENDER_SECONDS = (10.0, 60.0)

#: ``progress(done, total, description)``
Progress = Callable[[int, int, str], None]


# -- workloads ------------------------------------------------------------------------------------

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
    """The endpoints to measure: those named (endpoint names or kinds), else every configured one, and local."""
    from broker.providers import endpoints

    # Every configured endpoint, whatever manager.providers routes, and local as one more to measure.
    manager = settings.manager.model_copy(update={"local": "ranked", "providers": None})
    routing = endpoints.resolve(settings.model_copy(update={"manager": manager}), options.providers)
    asked = None if options.providers is None else {endpoints.norm(n) for n in options.providers}
    for row in routing.rows:
        named = asked is None or endpoints.norm(row.name) in asked or row.kind in asked
        if not row.routed and named and not row.reason.startswith("excluded"):
            skipped[row.name] = row.detail or row.reason
    found = list(routing.ranked)
    if options.providers is not None and "local" not in options.providers:
        found = [p for p in found if p.kind != "local"]
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
        row = catalog.price(cal.price_kind, cal.hardware)  # prices key on the kind; the row names the endpoint
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
    kinds = {cal.provider: cal.price_kind for cal in calibrations}  # measured rows name endpoints
    if options.volume:
        for r in rows:
            n_warm, idle = keep_warm(settings, r.provider)
            month.append(monthly(r, catalog.price(kinds.get(r.provider, r.provider), r.hardware), options.volume,
                                 min_workers=n_warm,
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


__all__ = ["BenchOptions", "BenchResult", "BenchRow", "MonthlyRow", "Progress", "Workload", "abench", "bench",
           "make_workloads", "parse_amounts"]
