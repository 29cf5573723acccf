"""A self-hosted fleet is priced by the machine-hour: jobs pay their share, a month pays each machine 24 h a day."""

from __future__ import annotations

import pytest

from broker.bench.model import MONTH_S, keep_warm
from broker.bench.run import BenchOptions, abench
from broker.money.pricing import Catalog
from broker.providers.http import HTTPProvider
from broker.settings import HTTPWorkerSettings, Settings


def _fleet_settings(**http: object) -> Settings:
    s = Settings()
    s.http = HTTPWorkerSettings(**{"urls": ["http://gpu-1:8000", "http://gpu-2:8000", "http://gpu-3:8000"],
                                   "hardware": "A100-80GB", "usd_per_hour": 0.66, **http})
    return s


def test_each_configured_machine_is_kept_warm() -> None:
    assert keep_warm(_fleet_settings(), "http") == (3, None)
    assert keep_warm(_fleet_settings(urls=[], url="http://lb:8000", machines=5), "http") == (5, None)
    assert keep_warm(Settings(), "http") == (0, None), "no fleet configured: nothing billed around the clock"


async def test_bench_volume_bills_the_fleet_around_the_clock() -> None:
    settings = _fleet_settings()
    options = BenchOptions(providers=["http"], words=(500,), render_seconds=(), volume=1000, measure_local=False)
    result = await abench(options, settings=settings, catalog=Catalog.from_settings(settings))
    [month] = [m for m in result.monthly if m.provider == "http" and m.hardware == "a100-80gb"]
    always_on = 3 * MONTH_S * 0.66 / 3600  # three machines, 720 h each
    assert month.usd == pytest.approx(always_on)
    assert month.usd_idle is not None and 0 < month.usd_idle < always_on
    assert "3 worker(s) kept warm" in month.model
    # a single job is still charged only its share of one machine's hour
    [row] = [r for r in result.rows if r.provider == "http" and r.hardware == "a100-80gb"]
    assert row.usd == pytest.approx(row.run_s * 0.66 / 3600, rel=0.05, abs=0.66 / 3600)


def test_a_pool_job_pays_its_share_of_one_machine() -> None:
    provider = HTTPProvider(urls=["http://gpu-1:8000", "http://gpu-2:8000"], usd_per_hour=0.66, hardware="A100-80GB")
    billing = provider.bill(3600.0, {})
    assert billing.cost_usd == pytest.approx(0.66) and billing.estimated
    provider.close()
