"""Scheduling on a virtual clock: spill-over across endpoints, concurrency limits, --deadline, quotes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from broker.longform import LongJob
from broker.longform.plan import Lane, simulate, workers_for_deadline
from broker.longform.text import Chapter
from broker.routing.manager import CloudGPUManager
from broker.settings import Settings
from broker.testing.clock import run_virtual
from broker.testing.fake import FakeProvider, fake_catalog


def chapters(words: int) -> list[Chapter]:
    sentences = [f"Sentence {i} moves the story along a little bit more." for i in range(words // 10)]
    return [Chapter("One", " ".join(sentences[: len(sentences) // 2])),
            Chapter("Two", " ".join(sentences[len(sentences) // 2:]))]


def manager(tmp_path: Path, *fakes: FakeProvider) -> CloudGPUManager:
    s = Settings()
    s.ledger.path = str(tmp_path / "l.sqlite")
    s.manager.fallback_local = False
    return CloudGPUManager(list(fakes), settings=s, catalog=fake_catalog(*fakes))


def test_fake_latency_model_cold_starts_each_worker_once() -> None:
    from broker.types import SpeechRequest

    fake = FakeProvider("m", rtf=0.5, cold_start_s=20.0, max_concurrency=2, usd_per_second=0.001)

    async def go() -> tuple[float, list[float]]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        req = SpeechRequest(text="word " * 25)  # 10 s of audio: 5 s of compute (the fake makes 0.9 of it)
        jobs = [await fake.submit(req) for _ in range(4)]
        for j in jobs:
            await j.wait()
        return loop.time() - t0, [j.billing.billed_seconds for j in jobs if j.billing]

    wall, billed = run_virtual(go())
    assert fake.workers_started == 2  # two workers, each cold once, then warm
    assert wall == pytest.approx(20 + 4.5 + 4.5, abs=0.5)  # model seconds (+ a little real time)
    assert sorted(billed) == pytest.approx([4.5, 4.5, 24.5, 24.5])  # billed in model seconds, exactly


def test_pieces_spill_from_the_cheapest_endpoint_when_it_is_saturated(tmp_path: Path) -> None:
    # rtf 0.05: the catalog's Piper-on-GPU profile, which the fakes' price rows point at
    cheap = FakeProvider("cheap", rtf=0.05, cold_start_s=5, max_concurrency=2, usd_per_second=0.0001)
    dear = FakeProvider("dear", rtf=0.05, cold_start_s=5, max_concurrency=3, usd_per_second=0.001)
    m = manager(tmp_path, cheap, dear)
    job = LongJob(m, chapters(3000), target_run_s=1.0)
    assert [lane.name for lane in job.lanes] == ["cheap", "dear"] and job.workers == 5
    result = run_virtual(job.run())
    job.close()
    assert set(result.providers) == {"cheap", "dear"}  # one book, two endpoints at once
    assert cheap.workers_started <= 2 and dear.workers_started <= 3
    assert result.providers["cheap"] > result.providers["dear"] / 3  # cheap is kept busy, not starved
    forecast = simulate(len(job.pieces), job.lanes, 5)
    assert result.wall_seconds == pytest.approx(forecast.wall_s, rel=0.25)


def test_deadline_picks_the_fewest_workers_that_meet_it(tmp_path: Path) -> None:
    fake = FakeProvider("f", rtf=0.05, cold_start_s=10, max_concurrency=16, usd_per_second=0.001)
    m = manager(tmp_path, fake)
    wide = LongJob(m, chapters(3000), target_run_s=1.0)
    serial_s = simulate(len(wide.pieces), wide.lanes, 1).wall_s
    wide.close()
    job = LongJob(m, chapters(3000), target_run_s=1.0, deadline_s=serial_s / 3)
    assert 3 <= job.workers < 16
    result = run_virtual(job.run())
    job.close()
    assert result.wall_seconds <= serial_s / 3 * 1.1
    assert fake.workers_started == job.workers  # no more cold starts (money) than the deadline needs


def test_workers_for_deadline_and_simulate() -> None:
    lane = Lane("a", 8, run_s=10.0, usd=0.01, cold_s=20.0, cold_usd=0.02, words=25)
    one = simulate(32, [lane], 1)
    assert one.wall_s == pytest.approx(20 + 320) and one.usd == pytest.approx(0.32 + 0.02)
    four = simulate(32, [lane], 4)
    assert four.wall_s == pytest.approx(20 + 80) and four.usd == pytest.approx(0.32 + 0.08)
    n, f = workers_for_deadline(32, [lane], 200.0)
    assert n == 2 and f.wall_s <= 200  # 20 + 160
    n, f = workers_for_deadline(32, [lane], 1.0)
    assert n == 8  # cannot be met: as wide as allowed
