"""A budget is never skipped (issue 11, item 3) and queue time is not a failure (item 4).

Seen before the fix: `BROKER_RUNPOD__HARDWARE=A100-SXM4-80GB` (no price row) under a $0.000001 budget
ran on the paid GPU and the ledger said $0; RunPod quotes said $0.0198 and settled $0.00076; jobs were
killed while still queued by a cost deadline that counted queue time; BudgetExceeded refused 96 of 100
jobs at once while the budget sat unused.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from conftest import run_cli
from money_support import A100, Worker, manager, rows, runpod

from broker.errors import AllProvidersFailed, BudgetExceeded
from broker.money.ledger import Ledger
from broker.routing.manager import CloudGPUManager
from broker.settings import Settings
from broker.testing.fake import FakeProvider, fake_catalog
from broker.testing.runpod_emulator import RunPodEmulator
from broker.types import SpeechRequest

TEXT = "ten words that take about a fifth of a second"  # quoted 0.2 s on the fakes' GPU


@pytest.fixture(scope="module")
def emu() -> RunPodEmulator:
    with RunPodEmulator(worker=False, long_poll_s=2) as emulator:
        yield emulator


async def test_hardware_without_a_price_is_not_run_under_a_budget(emu: RunPodEmulator, tmp_path: Path) -> None:
    before = set(emu.state()["jobs"])
    m = manager(emu, tmp_path / "l.sqlite", provider=runpod(emu, hardware="A100-SXM4-80GB"),
                daily_budget_usd=0.000001)
    plan = m.plan(SpeechRequest(text="Hello there."))
    assert plan.ordered == [] and "no price row" in plan.dropped[0][1]
    with pytest.raises(AllProvidersFailed, match="no price row"):
        await m.arun(SpeechRequest(text="Hello there."))
    # the same with only a per-job cap
    m2 = manager(emu, tmp_path / "l2.sqlite", provider=runpod(emu, hardware="A100-SXM4-80GB"))
    with pytest.raises(AllProvidersFailed, match="no price row"):
        await m2.arun(SpeechRequest(text="Hello there."), max_usd=1.0)
    assert set(emu.state()["jobs"]) == before  # nothing reached the paid GPU
    for mm in (m, m2):
        mm.ledger.close()


def test_broker_quote_says_why_an_unpriced_provider_is_dropped(emu: RunPodEmulator) -> None:
    env = {**emu.env(), "BROKER_RUNPOD__HARDWARE": "A100-SXM4-80GB", "BROKER_MANAGER__PROVIDERS": '["runpod"]',
           "BROKER_MANAGER__DAILY_BUDGET_USD": "0.000001"}
    result = run_cli("quote", "Hello there.", "--json", env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    dropped = {d["provider"]: d["reason"] for d in json.loads(result.stdout)["dropped"]}
    assert "no price row" in dropped["runpod"]


async def test_a_configured_fallback_price_prices_unknown_hardware(emu: RunPodEmulator, tmp_path: Path) -> None:
    s = Settings()
    s.manager.unknown_price_usd_per_hour = 3.6
    s.manager.fallback_local = False
    s.manager.daily_budget_usd = 0.000001
    before = set(emu.state()["jobs"])
    m = CloudGPUManager([runpod(emu, hardware="A100-SXM4-80GB")], settings=s, ledger=Ledger(tmp_path / "l.sqlite"))
    (cand,) = m.plan(SpeechRequest(text="Hello there.")).ordered
    assert cand.priced and cand.usd >= 0.001  # at least one billed second at $0.001/s, never $0
    with pytest.raises(BudgetExceeded):
        await m.arun(SpeechRequest(text="Hello there."))
    assert set(emu.state()["jobs"]) == before
    m.ledger.close()


async def test_without_a_budget_an_unpriced_run_is_recorded_as_unpriced(emu: RunPodEmulator, tmp_path: Path) -> None:
    m = manager(emu, tmp_path / "l.sqlite", provider=runpod(emu, hardware="A100-SXM4-80GB", queue_timeout_s=30))
    worker = Worker(emu)

    async def serve() -> None:
        job_id = await asyncio.to_thread(worker.take)
        assert job_id is not None
        await asyncio.to_thread(worker.finish, job_id)

    await asyncio.gather(m.arun(SpeechRequest(text="Hello there.")), serve())
    m.ledger.flush()
    (row,) = rows(tmp_path / "l.sqlite")
    assert row["status"] == "succeeded" and row["unpriced"] == 1 and row["billed_seconds"] >= 5  # idle timeout
    m.ledger.close()


async def test_runpod_quote_and_settled_cost_agree(emu: RunPodEmulator, tmp_path: Path) -> None:
    emu.set_faults(cold_start_s=1.0)  # the catalog row used here says 1 s too
    try:
        m = manager(emu, tmp_path / "l.sqlite", provider=runpod(emu, queue_timeout_s=30))
        request = SpeechRequest(text="Hello there.")
        quoted = m.quote_provider(m.providers[0], request).expected_usd
        worker = Worker(emu, "cold-worker")  # a worker that has just started: its first job pays the start-up

        async def serve() -> str:
            job_id = await asyncio.to_thread(worker.take)
            assert job_id is not None
            await asyncio.to_thread(worker.finish, job_id)
            return job_id

        _, job_id = await asyncio.gather(m.arun(request), serve())
        m.ledger.flush()
        (row,) = rows(tmp_path / "l.sqlite")
        runpod_bill = emu.state()["billed_seconds"][job_id] * A100.usd_per_second
        assert row["cost_usd"] == pytest.approx(runpod_bill)  # cold start + run + idle timeout, as RunPod bills
        assert abs(row["cost_usd"] - quoted) <= A100.usd_per_second + 1e-9  # within one billed second
    finally:
        emu.set_faults(cold_start_s=0.0)
        m.ledger.close()


# -- item 4: queue time is not a failure --------------------------------------------------------------
def _budgeted(daily: float) -> Settings:
    s = Settings()
    s.manager.fallback_local = False
    s.manager.daily_budget_usd = daily
    return s


async def test_time_in_the_queue_does_not_use_up_the_reservation() -> None:
    # Quoted 0.2 s ($0.002), reserved twice that: 0.4 s of running. It waits 1 s in the queue first.
    queued = FakeProvider("queued", queue_s=1.0, latency_s=0.05, usd_per_second=0.01)
    m = CloudGPUManager([queued], settings=_budgeted(1.0), catalog=fake_catalog(queued))
    out = await m.arun(SpeechRequest(text=TEXT))
    assert out.report is not None and out.report.provider == "queued"
    assert queued.left_running() == []


async def test_a_budget_full_of_reservations_waits_for_room() -> None:
    # Each job reserves $0.004 and is billed $0.0002: three fit at once, all twenty fit in the budget.
    cheap = FakeProvider("cheap", latency_s=0.05, billed_seconds=0.02, usd_per_second=0.01)
    m = CloudGPUManager([cheap], settings=_budgeted(0.013), catalog=fake_catalog(cheap))
    results = await asyncio.gather(*(m.arun(SpeechRequest(text=TEXT), deadline_s=60) for _ in range(20)),
                                   return_exceptions=True)
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert m.ledger.spent(window_s=86400) <= 0.013


async def test_a_budget_spent_for_real_fails_at_once() -> None:
    cheap = FakeProvider("cheap", latency_s=0.05, usd_per_second=0.01)
    m = CloudGPUManager([cheap], settings=_budgeted(0.01), catalog=fake_catalog(cheap))
    m.ledger.record_attempt("earlier", "cheap", "succeeded", started_at=time.time(), cost_usd=0.0099)
    started = time.monotonic()
    with pytest.raises(BudgetExceeded):
        await m.arun(SpeechRequest(text=TEXT), deadline_s=60)
    assert time.monotonic() - started < 5  # no waiting: settled spend will not come back
    assert cheap.submits == 0
