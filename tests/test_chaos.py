"""The chaos run: 1,000 jobs over providers that fail in every way the field does.

Providers randomly return 5xx, 429 with Retry-After, drop the connection, hang in the queue,
hang while running, fail, die mid-job, or answer with silent, truncated or NaN audio. Every job
must end with valid output or a typed error; no output is delivered twice; the ledger's total
equals the sum of the attempts in the reports; no provider job is left running.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from broker.errors import AllProvidersFailed, BrokerError, InvalidRequest
from broker.media import Audio
from broker.routing.manager import CloudGPUManager, ManagedJob
from broker.routing.validate import check_output
from broker.settings import Settings
from broker.testing.fake import FakeProvider, fake_catalog
from broker.types import SpeechRequest

FAILURES = ("unavailable", "rate_limited", "transport", "stuck", "hang", "failed", "lost", "silent", "truncated",
            "nan")


def chaos_script(failure_rate: float) -> dict[str, float]:
    """Every failure mode at once, in proportion; ``invalid`` (the request's fault) rarely."""
    weights = {f: failure_rate / len(FAILURES) for f in FAILURES}
    weights["invalid"] = 0.002
    weights["ok"] = 1.0 - failure_rate
    return weights


def chaos_settings(**manager: object) -> Settings:
    s = Settings()
    m = s.manager
    m.fallback_local = False
    m.deadline_s = 3.0
    m.backoff_initial_s = 0.005
    m.backoff_max_s = 0.02
    m.backoff_jitter_s = 0.005
    m.failover_after_s = 0.02
    m.breaker_ejection_s = 0.05
    m.breaker_max_ejection_s = 0.2
    m.min_run_timeout_s = 0.15
    m.run_timeout_factor = 2.0
    m.queue_timeout_s = 0.1
    for k, v in manager.items():
        setattr(m, k, v)
    return s


def chaos_providers(seed: int) -> list[FakeProvider]:
    # The cheapest providers are the flakiest: the manager must fail over to dearer, steadier ones.
    rates = (0.6, 0.4, 0.25, 0.1)
    return [
        FakeProvider(f"p{i}", script=chaos_script(rate), seed=seed + i, latency_s=0.002 * i, queue_s=0.001,
                     usd_per_second=0.0002 * (i + 1), retry_after_s=0.01 * (i + 1), queue_timeout_s=0.05)
        for i, rate in enumerate(rates)
    ]


async def run_chaos(n_jobs: int, seed: int, concurrency: int = 100, **manager: object) -> None:
    providers = chaos_providers(seed)
    manager_obj = CloudGPUManager(providers, settings=chaos_settings(**manager), catalog=fake_catalog(*providers))
    jobs: list[ManagedJob] = []
    in_flight = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Audio:
        async with in_flight:
            job = await manager_obj.submit(SpeechRequest(text=f"chaos job number {i} says a few plausible words"))
            assert isinstance(job, ManagedJob)
            jobs.append(job)
            out = await job.result()
            assert isinstance(out, Audio)
            return out

    results = await asyncio.gather(*(one(i) for i in range(n_jobs)), return_exceptions=True)
    # gather keeps submission order; jobs were appended as each started, so pair them by request text.
    by_text = {j.request.text: j for j in jobs}  # type: ignore[union-attr]
    jobs = [by_text[f"chaos job number {i} says a few plausible words"] for i in range(n_jobs)]

    delivered: dict[int, str] = {}
    succeeded = failed = 0
    for job, res in zip(jobs, results, strict=True):
        if isinstance(res, Audio):
            succeeded += 1
            check_output(job.request, res)  # valid output only
            assert res.report is job.report and res.report.provider is not None
            assert id(res) not in delivered, "one output delivered to two jobs"
            delivered[id(res)] = job.id
            wins = [a for a in job.report.attempts if a.outcome == "succeeded" and a.provider == res.report.provider]
            assert wins, "the delivered output has no succeeded attempt behind it"
        else:
            failed += 1
            assert isinstance(res, BrokerError), f"untyped error {type(res).__name__}: {res}"
            assert isinstance(res, AllProvidersFailed | InvalidRequest), type(res)
        # A fallback never re-enters a provider already tried for this job.
        visited = job.providers_tried
        assert len(visited) == len(set(visited)), f"a provider was re-entered: {visited}"
        assert {a.provider for a in job.report.attempts} <= set(visited)

    assert succeeded > n_jobs * 0.5, (succeeded, failed)
    bites = [a for j in jobs for a in j.report.attempts if a.outcome != "succeeded"]
    assert len(bites) > n_jobs * 0.1  # the chaos does bite: many attempts failed on the way
    assert {a.error_class for a in bites} >= {"ProviderUnavailable", "RateLimited", "ProviderTimeout", "JobFailed",
                                              "JobLost", "BadOutput"}

    # Ledger total == sum of every attempt in every report (and one ledger row per attempt).
    report_attempts = [a for j in jobs for a in j.report.attempts if a.outcome != "skipped"]
    rows = manager_obj.ledger.attempts()
    assert len(rows) == len(report_attempts)
    assert math.isclose(manager_obj.ledger.total(), sum(a.cost_usd for a in report_attempts), rel_tol=1e-9,
                        abs_tol=1e-12)
    assert math.isclose(manager_obj.ledger.total(), sum(j.report.cost_usd for j in jobs), rel_tol=1e-9,
                        abs_tol=1e-12)
    assert not [r for r in rows if r["status"] in ("reserved", "running")], "an attempt was never settled"

    # No provider job left running: each finished on its own or was cancelled by the manager.
    for p in providers:
        assert p.left_running() == [], f"{p.name} has jobs still running"
        for fj in p.jobs:
            if fj.behaviour in ("stuck", "hang"):
                assert fj.cancel_called, f"{p.name}:{fj.id} ({fj.behaviour}) was abandoned without a cancel"


@pytest.mark.timeout(60)
async def test_chaos_thousand_jobs() -> None:
    await run_chaos(1000, seed=11)


@pytest.mark.timeout(60)
async def test_chaos_with_hedging() -> None:
    await run_chaos(300, seed=23, hedge_after_s=0.01)
