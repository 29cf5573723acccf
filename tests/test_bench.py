"""`broker bench` logic: calibration against scripted fake providers, projection, monthly model, parsing."""

from __future__ import annotations

import math

import pytest

from broker.bench.measure import Calibration, JobTiming, TaskSpeed, calibrate, fit_line, speed_from
from broker.bench.model import MONTH_S, Workload, estimated_speed, keep_warm, measured_speeds, monthly, project
from broker.bench.run import BenchOptions, abench, parse_amounts
from broker.errors import InvalidRequest
from broker.money.ledger import Ledger
from broker.money.pricing import Catalog, PriceRow
from broker.settings import Settings
from broker.testing.fake import FakeProvider, fake_catalog

CATALOG = Catalog.packaged()


def row(**kw: object) -> PriceRow:
    base: dict[str, object] = dict(provider="cloud", hardware=("gpu-x",), profile="gpu", usd_per_second=0.001,
                                   min_billed_s=1, increment_s=1, cold_start_s=20, idle_s=5)
    base.update(kw)
    return PriceRow(**base)  # type: ignore[arg-type]


# -- parsing ------------------------------------------------------------------------------------------
def test_parse_amounts() -> None:
    assert parse_amounts("500, 2000,10_000", "words", integer=True) == (500, 2000, 10000)
    assert parse_amounts("10,60,10", "render_seconds", integer=False) == (10.0, 60.0)  # duplicates dropped
    assert parse_amounts("none", "words", integer=True) == ()
    assert parse_amounts("", "words", integer=True) == ()
    for bad in ("500,abc", "-5", "nan", "2.5"):
        with pytest.raises(InvalidRequest) as info:
            parse_amounts(bad, "words", integer=True)
        assert info.value.field == "words"


async def test_nothing_to_bench_and_no_warm_runs_are_bad_input() -> None:
    with pytest.raises(InvalidRequest):
        await abench(BenchOptions(words=(), render_seconds=(), measure_local=False))
    with pytest.raises(InvalidRequest):
        await abench(BenchOptions(warm_runs=0, measure_local=False))


# -- measuring ----------------------------------------------------------------------------------------
def test_fit_line_uses_least_squares_or_falls_back_through_the_origin() -> None:
    slope, intercept = fit_line([(2.0, 1.2), (4.0, 2.2), (6.0, 3.2)])
    assert slope == pytest.approx(0.5) and intercept == pytest.approx(0.2)
    # noise that would give a negative fixed cost: total run / total output instead
    slope, intercept = fit_line([(6.0, 1.79), (12.6, 3.85)])
    assert intercept == 0.0 and slope == pytest.approx((1.79 + 3.85) / 18.6)
    assert fit_line([(5.0, 1.0), (5.0, 1.2)]) == (pytest.approx(0.22), 0.0)  # one length: no line to fit
    # two short renders 0.01 s apart: a near-flat line would make a 60 s render free; use the average
    slope, intercept = fit_line([(4.0, 0.28), (2.0, 0.27)])
    assert intercept == 0.0 and slope == pytest.approx(0.55 / 6)
    with pytest.raises(ValueError):
        fit_line([])


def test_speed_from_separates_cold_start_from_run() -> None:
    jobs = [
        JobTiming("speech", cold=True, ok=True, wall_s=13.0, queue_s=11.0, run_s=1.8, overhead_s=0.2, output_s=6.0),
        JobTiming("speech", cold=False, ok=True, wall_s=4.1, queue_s=0.5, run_s=3.4, overhead_s=0.2, output_s=12.0),
        JobTiming("speech", cold=False, ok=True, wall_s=2.5, queue_s=0.5, run_s=1.8, overhead_s=0.2, output_s=6.0),
    ]
    speed = speed_from(jobs)
    assert speed.k == pytest.approx(1.6 / 6) and speed.fixed_s == pytest.approx(0.2)
    assert speed.queue_s == pytest.approx(0.5) and speed.overhead_s == pytest.approx(0.2)
    # the cold job took 13 s where a warm one of its length takes 0.5 + 0.2 + 1.8 = 2.5 s
    assert speed.cold_start_s == pytest.approx(10.5)
    assert speed.basis == "measured" and speed.cold_basis == "measured"


async def test_calibrate_a_fake_provider_cold_then_warm() -> None:
    fake = FakeProvider("cloud", queue_s=0.05, cold_start_s=0.4, latency_s=0.05, usd_per_second=0.001)
    seen: list[str] = []
    cal = await calibrate(fake, tasks=("speech", "render"), warm_runs=2, on_job=seen.append)
    assert len(seen) == 6 and seen[0] == "cloud: speech (cold)" and seen[1] == "cloud: speech (warm)"
    assert [j.cold for j in cal.jobs] == [True, False, False, True, False, False]
    assert all(j.ok for j in cal.jobs) and not cal.errors
    first = cal.jobs[0]
    # the fake reports run seconds on its bill; the queue comes from the job's timestamps
    assert first.timing_source == "provider metrics + job timestamps"
    assert first.run_s >= 0.4 and first.queue_s >= 0.04
    speech = cal.speeds["speech"]
    assert 0.25 < speech.cold_start_s < 2.0, "the fake's one cold start shows up, and only once"
    assert cal.speeds["render"].cold_start_s < 0.25
    assert cal.cost_usd > 0 and cal.seconds_per_word() is not None
    assert not fake.left_running()


async def test_a_failing_task_is_reported_and_the_rest_still_measured() -> None:
    fake = FakeProvider("cloud", script=["ok", "ok", "ok", "failed"])
    seen: list[str] = []
    cal = await calibrate(fake, warm_runs=2, on_job=seen.append)
    assert "speech" in cal.speeds and "render" not in cal.speeds
    assert cal.errors["render"].startswith("JobFailed")
    assert len(seen) == 6, "jobs not run still advance the progress count"
    speeds = measured_speeds(cal, CATALOG, row(), "piper")
    assert speeds["speech"].basis == "measured"
    assert speeds["render"].basis != "measured" and "render not measured (JobFailed" in speeds["render"].notes[0]


async def test_provider_without_a_task_is_skipped_with_the_reason() -> None:
    fake = FakeProvider("cloud", tasks=frozenset({"speech"}))
    cal = await calibrate(fake, warm_runs=1)
    assert set(cal.speeds) == {"speech"} and "does not run render jobs" in cal.errors["render"]
    assert all(j.task == "speech" for j in cal.jobs)


def test_a_warm_first_job_on_a_scale_to_zero_provider_falls_back_to_the_catalog_cold_start() -> None:
    cal = Calibration("cloud", "gpu-x", speeds={"speech": TaskSpeed(k=0.1, cold_start_s=0.05, basis="measured",
                                                                      cold_basis="measured")})
    speed = measured_speeds(cal, CATALOG, row(cold_start_s=20), "piper")["speech"]
    assert speed.cold_start_s == 20 and speed.cold_basis == "estimate" and "warm worker" in speed.notes[0]
    # an always-on provider keeps what was measured
    speed = measured_speeds(cal, CATALOG, row(cold_start_s=0), "piper")["speech"]
    assert speed.cold_start_s == 0.05 and speed.cold_basis == "measured"


# -- projecting ---------------------------------------------------------------------------------------
def test_project_prices_a_cold_job_with_cold_start_and_idle_tail() -> None:
    price = row()
    speed = TaskSpeed(k=0.1, fixed_s=1.0, queue_s=0.5, overhead_s=0.3, cold_start_s=20.0)
    r = project("cloud", "gpu-x", speed, price, Workload("speech", 1000), 0.4, measured=True)
    assert r.output_s == pytest.approx(400)
    assert r.run_s == pytest.approx(41.0)
    assert r.warm_wall_s == pytest.approx(41.8) and r.wall_s == pytest.approx(61.8)
    # billed: run 41 + cold 20 + idle 5 = 66 s
    assert r.usd == pytest.approx(0.066) and r.usd_warm == pytest.approx(0.046)
    assert r.usd_per_output_min == pytest.approx(0.066 / (400 / 60))
    free = project("local", "cpu", speed, row(usd_per_second=0.0), Workload("render", 10), 0.4, measured=True)
    assert free.usd == 0.0 and free.output_s == 10
    unpriced = project("x", "y", speed, None, Workload("render", 10), 0.4, measured=False)
    assert unpriced.usd is None and unpriced.price_basis == "unpriced"


def test_estimates_use_the_profile_and_say_so() -> None:
    a100 = CATALOG.price("runpod", "A100-80GB")
    assert a100 is not None
    speech = estimated_speed(CATALOG, a100, "speech", "csm")
    assert speech.k == 0.6 and speech.basis == "estimate" and "csm" in speech.source
    render = estimated_speed(CATALOG, a100, "render", "piper")
    fps = CATALOG.profile("render", a100.profile)
    assert fps is not None and render.k == pytest.approx(25 / fps.value) and f"{fps.value:g} fps" in render.source
    assert speech.cold_start_s == a100.cold_start_s and "catalog" in speech.cold_source


def test_monthly_model_limits() -> None:
    price = row(usd_per_second=0.001, cold_start_s=20, idle_s=5)
    r = project("cloud", "gpu-x", TaskSpeed(k=0.0, fixed_s=10.0, cold_start_s=20.0), price,
                Workload("speech", 100), 0.4, measured=False)
    # rare jobs: every one is cold and pays its whole idle tail
    rare = monthly(r, price, 10)
    assert rare.cold_share == pytest.approx(1.0, abs=1e-3)
    assert rare.usd == pytest.approx(10 * 0.001 * (10 + 20 + 5), rel=1e-3)
    # a job every ~10 s with a 60 s idle window: almost none cold, each tail shrinks to the gap between jobs
    long_idle = row(usd_per_second=0.001, cold_start_s=20, idle_s=60)
    busy = monthly(r, long_idle, int(MONTH_S / 10))
    assert busy.cold_share < 0.01
    assert busy.usd == pytest.approx(busy.jobs * 0.001 * (10 + 10), rel=0.01)
    assert busy.usd is not None and rare.usd is not None and busy.usd / busy.jobs < rare.usd / rare.jobs
    # a worker kept warm is billed all month, whatever the volume
    warm = monthly(r, price, 10, min_workers=1)
    assert warm.usd == pytest.approx(MONTH_S * 0.001) and warm.cold_share == 0
    assert warm.usd_idle == pytest.approx(MONTH_S * 0.001 - 10 * 10 * 0.001)
    # per-job billing with no idle: jobs × cost
    flat = row(cold_start_s=0, idle_s=0, bills_idle=False, min_billed_s=0)
    assert monthly(r, flat, 100).usd == pytest.approx(100 * 10 * 0.001)
    assert math.isclose(monthly(r, None, 5).compute_hours, 5 * 10 / 3600)


def test_keep_warm_reads_the_provider_settings() -> None:
    s = Settings()
    s.runpod.workers_min, s.runpod.idle_timeout_s = 1, 30
    assert keep_warm(s, "runpod") == (1, 30.0)
    assert keep_warm(s, "modal") == (0, float(s.modal.scaledown_window_s))
    assert keep_warm(s, "replicate") == (0, None)
    assert keep_warm(s, "http") == (0, None)


# -- the whole run, in process ----------------------------------------------------------------------------
async def test_live_bench_over_given_providers_records_the_ledger() -> None:
    fast = FakeProvider("fast", cold_start_s=0.3, latency_s=0.02, usd_per_second=0.002, hardware="fast-gpu")
    slow = FakeProvider("local", latency_s=0.2, hardware="cpu")
    ledger = Ledger(":memory:")
    progress: list[tuple[int, int]] = []
    options = BenchOptions(estimate=False, live=True, providers=[], words=(500, 10_000), render_seconds=(10,),
                           warm_runs=1, volume=1000)
    result = await abench(options, providers=[fast, slow], catalog=fake_catalog(fast), ledger=ledger,
                          progress=lambda done, total, what: progress.append((done, total)))
    assert progress[-1] == (8, 8) and [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert {(r.provider, r.workload) for r in result.rows} == {
        (p, w) for p in ("fast", "local") for w in ("500 words", "10,000 words", "10 s render")}
    fast_rows = {r.workload: r for r in result.rows if r.provider == "fast"}
    assert all(r.measured for r in result.rows)
    assert fast_rows["10,000 words"].usd > fast_rows["500 words"].usd > 0  # type: ignore[operator]
    assert fast_rows["500 words"].cold_start_s > 0.15
    local = next(r for r in result.rows if r.provider == "local" and r.workload == "500 words")
    assert local.speedup_vs_local == pytest.approx(1.0)
    assert fast_rows["500 words"].speedup_vs_local is not None
    assert len(result.monthly) == len(result.rows)
    attempts = ledger.attempts()
    assert len(attempts) == 8 and {a["provider"] for a in attempts} == {"fast", "local"}
    assert ledger.total() == pytest.approx(result.calibration_cost_usd)
    data = result.to_dict()
    assert data["mode"] == "live" and data["seconds_per_word"]["basis"] == "measured"
    assert not fast.left_running() and not slow.left_running()


async def test_a_provider_that_fails_every_job_gets_estimated_rows_saying_why() -> None:
    down = FakeProvider("down", script=["unavailable"], usd_per_second=0.001, hardware="down-gpu")
    local = FakeProvider("local", latency_s=0.01, hardware="cpu")
    options = BenchOptions(estimate=False, live=True, providers=[], words=(500,), render_seconds=(10,), warm_runs=1)
    result = await abench(options, providers=[down, local], catalog=fake_catalog(down))
    rows = [r for r in result.rows if r.provider == "down"]
    assert {r.workload for r in rows} == {"500 words", "10 s render"}
    assert not any(r.measured for r in rows)
    assert all(any("not measured (ProviderUnavailable" in n for n in r.notes) for r in rows)
    assert down.submits == 2, "one failed cold job per task, then the task is given up"
    assert result.seconds_per_word.basis == "measured", "the pace comes from the provider that did answer"


async def test_cancelled_bench_cancels_the_job_in_flight() -> None:
    import asyncio

    stuck = FakeProvider("stuck", script=["stuck"])
    task = asyncio.create_task(calibrate(stuck, tasks=("speech",), warm_runs=1))
    while not stuck.jobs:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stuck.jobs[0].cancel_called and not stuck.left_running()


def test_progress_bar_only_when_asked() -> None:
    from broker.cli.bench import _progress_bar

    with _progress_bar(False) as none:
        assert none is None
    with _progress_bar(True) as update:
        assert update is not None
        update(0, 3, "local: speech (cold)")
        update(3, 3, "projecting")
