"""The ledger (SQLite, WAL, shared by processes) and budgets reserved before dispatch."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker.errors import BudgetExceeded
from broker.money.ledger import Ledger, SpendLimit
from broker.routing.manager import CloudGPUManager
from broker.settings import Settings
from broker.testing.fake import FakeProvider, fake_catalog
from broker.types import SpeechRequest

TEXT = "ten words that take about a fifth of a second"  # ~4 s of speech, quoted 0.2 s on a GPU


def test_attempts_are_recorded_and_summarised(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.record_attempt("j1", "runpod", "succeeded", started_at=time.time(), billed_seconds=3, cost_usd=0.5,
                          provider_job_id="rp-1", cost_estimated=False)
    ledger.record_attempt("j1", "modal", "failed", started_at=time.time(), error_class="JobLost", cost_usd=0.25)
    aid, reserved = ledger.open_attempt("j2", "runpod", reserved_usd=0.1)
    assert reserved == 0.1
    ledger.close_attempt(aid, "succeeded", cost_usd=0.05, billed_seconds=1)
    rows = ledger.attempts()
    assert [r["status"] for r in rows] == ["succeeded", "failed", "succeeded"]
    assert rows[0]["provider_job_id"] == "rp-1" and rows[0]["cost_estimated"] == 0
    assert ledger.total() == pytest.approx(0.8)
    summary = {r["provider"]: r for r in ledger.summary()}
    assert summary["runpod"]["cost_usd"] == pytest.approx(0.55) and summary["runpod"]["attempts"] == 2
    assert summary["modal"]["failed"] == 1
    ledger.close()
    # WAL, and a second connection (another process would be the same) sees everything
    other = Ledger(tmp_path / "l.sqlite")
    assert other.total() == pytest.approx(0.8)
    assert other._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other.close()


def test_reservation_checks_every_limit_and_writes_nothing_when_over() -> None:
    ledger = Ledger()
    daily = SpendLimit("daily", 1.0, window_s=86400)
    aid, got = ledger.open_attempt("a", "p", reserved_usd=0.8, min_reserved_usd=0.4, limits=[daily])
    assert got == pytest.approx(0.8)
    # 0.2 left: a reservation that wants 0.6 but needs at least 0.15 is shrunk to the headroom
    _, got = ledger.open_attempt("b", "p", reserved_usd=0.6, min_reserved_usd=0.15, limits=[daily])
    assert got == pytest.approx(0.2)
    with pytest.raises(BudgetExceeded, match="daily"):
        ledger.open_attempt("c", "p", reserved_usd=0.1, limits=[daily])
    assert len(ledger.attempts()) == 2
    # settling below the reservation frees the difference
    ledger.close_attempt(aid, "succeeded", cost_usd=0.3)
    assert ledger.spent(window_s=86400) == pytest.approx(0.5)
    ledger.open_attempt("c", "p", reserved_usd=0.4, limits=[daily])


def test_expired_reservations_stop_counting() -> None:
    ledger = Ledger()
    now = time.time()
    ledger.open_attempt("dead", "p", reserved_usd=5.0, expires_at=now - 1, now=now - 100)
    assert ledger.spent(window_s=86400) == 0.0


def _budget_settings(path: str, daily: float) -> Settings:
    s = Settings()
    s.ledger.path = path
    s.manager.fallback_local = False
    s.manager.daily_budget_usd = daily
    return s


async def test_hundred_concurrent_jobs_never_overspend_a_small_budget() -> None:
    # Each job is quoted $0.002 and billed exactly that; reservations are twice the quote (within what is
    # left). $0.011 lets three run at once: a check that was not atomic would let more in and overspend.
    fake = FakeProvider("gpu", latency_s=0.15, billed_seconds=0.2, usd_per_second=0.01)
    budget = 0.011
    manager = CloudGPUManager([fake], settings=_budget_settings(":memory:", budget), catalog=fake_catalog(fake))
    results = await asyncio.gather(*(manager.arun(SpeechRequest(text=TEXT)) for _ in range(100)),
                                   return_exceptions=True)
    ok = [r for r in results if not isinstance(r, BaseException)]
    over = [r for r in results if isinstance(r, BudgetExceeded)]
    assert len(ok) + len(over) == 100, [r for r in results if isinstance(r, BaseException)][:3]
    assert 1 <= len(ok) <= 5
    spent = manager.ledger.spent(window_s=86400)
    assert spent <= budget
    assert sum(r.report.cost_usd for r in ok) <= budget  # type: ignore[union-attr]
    # BudgetExceeded came before anything was spent: the provider only ever saw the jobs that ran.
    assert fake.submits == len(ok)


async def test_per_job_cap_drops_dear_providers_and_raises_before_dispatch() -> None:
    dear = FakeProvider("dear", usd_per_second=1.0)
    s = Settings()
    s.manager.fallback_local = False
    manager = CloudGPUManager([dear], settings=s, catalog=fake_catalog(dear))
    plan = manager.plan(SpeechRequest(text=TEXT), max_usd=0.01)
    assert plan.ordered == [] and "per-job cap" in plan.dropped[0][1]
    with pytest.raises(BudgetExceeded, match="per-job cap"):
        await manager.arun(SpeechRequest(text=TEXT), max_usd=0.01)
    assert dear.submits == 0


async def test_a_running_job_is_stopped_before_it_costs_more_than_reserved() -> None:
    slow = FakeProvider("slow", latency_s=30.0, usd_per_second=0.01)  # quoted 0.2 s, runs far longer
    s = _budget_settings(":memory:", 1.0)
    s.manager.reserve_factor = 3.0
    s.manager.run_timeout_factor = None  # only the reservation bounds it here
    manager = CloudGPUManager([slow], settings=s, catalog=fake_catalog(slow))
    with pytest.raises(Exception, match="reserved"):
        await manager.arun(SpeechRequest(text=TEXT))
    (row,) = manager.ledger.attempts()
    assert row["cost_usd"] <= row["reserved_usd"] + 0.01 * 0.05  # stopped within a poll of the cap
    assert slow.left_running() == []


_WORKER = r"""
import asyncio, json, sys
from broker.errors import BudgetExceeded
from broker.routing.manager import CloudGPUManager
from broker.settings import Settings
from broker.testing.fake import FakeProvider, fake_catalog
from broker.types import SpeechRequest

async def main(path, budget, start_at):
    s = Settings()
    s.ledger.path = path
    s.manager.fallback_local = False
    s.manager.daily_budget_usd = budget
    fake = FakeProvider("gpu", latency_s=0.15, billed_seconds=0.2, usd_per_second=0.01, seed=None)
    m = CloudGPUManager([fake], settings=s, catalog=fake_catalog(fake))
    import time
    await asyncio.sleep(max(0.0, start_at - time.time()))  # both processes start together
    rs = await asyncio.gather(*(m.arun(SpeechRequest(text=sys.argv[4])) for _ in range(50)), return_exceptions=True)
    m.ledger.flush()
    print(json.dumps({"ok": sum(not isinstance(r, BaseException) for r in rs),
                      "over": sum(isinstance(r, BudgetExceeded) for r in rs),
                      "other": [repr(r) for r in rs
                                if isinstance(r, BaseException) and not isinstance(r, BudgetExceeded)]}))

asyncio.run(main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3])))
"""


@pytest.mark.slow
def test_two_processes_sharing_a_ledger_never_overspend(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.sqlite")
    budget = 0.011
    Ledger(path).close()  # create it once, so neither worker races to build the schema
    start_at = time.time() + 3.0
    env = {**os.environ, "BROKER_LEDGER__PATH": path}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, path, str(budget), str(start_at), TEXT],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert all(o["other"] == [] for o in outs), outs
    assert all(o["ok"] + o["over"] == 50 for o in outs)
    ledger = Ledger(path)
    assert ledger.spent(window_s=86400) <= budget
    assert ledger.total() <= budget
    assert len({r["job_id"] for r in ledger.attempts()}) == sum(o["ok"] for o in outs)
