"""`broker worker serve`'s /metrics: Prometheus text that Prometheus' own parser reads, behind the API key."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from broker import wire
from broker.testing.asgi_server import LoopbackServer
from broker.types import SpeechRequest, build
from broker.worker.metrics import CONTENT_TYPE, WorkerMetrics
from broker.worker.server import create_app

parser = pytest.importorskip("prometheus_client.parser")
pytestmark = pytest.mark.usefixtures("piper_available")

KEY = "metrics-key-91c0"
LONG_TEXT = " ".join(f"Sentence {i} of a passage that keeps the only job slot busy for a while." for i in range(8))


@pytest.fixture(scope="module")
def worker() -> Iterator[LoopbackServer]:
    with LoopbackServer(create_app(api_key=KEY, concurrency=1, max_waiting=4, preload_render=False)) as server:
        deadline = time.monotonic() + 120
        while not httpx.get(f"{server.url}/ready").json()["ready"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield server


def _scrape(url: str) -> dict[str, list[Any]]:
    r = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["content-type"] == CONTENT_TYPE
    return {f.name: f.samples for f in parser.text_string_to_metric_families(r.text)}


def _value(families: dict[str, list[Any]], name: str, **labels: str) -> float:
    family = name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    for s in families[family]:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise AssertionError(f"no sample {name}{labels}")


def test_metrics_need_the_key(worker: LoopbackServer) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(f"{worker.url}/metrics", headers=headers)
        assert r.status_code == 401 and "broker_worker" not in r.text


async def test_queue_depth_slots_and_job_seconds(worker: LoopbackServer) -> None:
    before = _scrape(worker.url)
    assert _value(before, "broker_worker_ready") == 1
    assert _value(before, "broker_worker_slots") == 1 and _value(before, "broker_worker_max_waiting") == 4
    assert _value(before, "broker_worker_engine_load_seconds") > 0
    headers = {"Authorization": f"Bearer {KEY}"}
    long_job = wire.encode_request(build(SpeechRequest, text=LONG_TEXT))
    short_job = wire.encode_request(build(SpeechRequest, text="A short one."))
    async with httpx.AsyncClient(timeout=120) as client:
        running = asyncio.ensure_future(client.post(f"{worker.url}/run", json=long_job, headers=headers))
        waiting = asyncio.ensure_future(client.post(f"{worker.url}/run", json=short_job, headers=headers))
        deadline = time.monotonic() + 60
        while True:  # one running, one waiting for the slot
            now = await asyncio.to_thread(_scrape, worker.url)
            if _value(now, "broker_worker_queue_depth") == 2 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        assert _value(now, "broker_worker_queue_depth") == 2
        assert _value(now, "broker_worker_slots_busy") == 1 and _value(now, "broker_worker_jobs_waiting") == 1
        bad = await client.post(f"{worker.url}/run", json={"v": 1, "task": "speech", "input": {"text": "x",
                                                                                             "speaker": 99}},
                                headers=headers)
        assert bad.status_code == 422
        assert (await running).status_code == 200 and (await waiting).status_code == 200
    after = _scrape(worker.url)
    assert _value(after, "broker_worker_queue_depth") == 0
    done = _value(after, "broker_worker_jobs_total", task="speech", outcome="ok")
    assert done - _ok_before(before) == 2
    assert _value(after, "broker_worker_job_seconds_count", task="speech", outcome="ok") == done
    assert _value(after, "broker_worker_job_seconds_sum", task="speech", outcome="ok") > 0.5, "the long job counted"
    assert _value(after, "broker_worker_jobs_total", task="speech", outcome="error") >= 1
    buckets = [s for s in after["broker_worker_job_seconds"] if s.name.endswith("_bucket")
               and s.labels["outcome"] == "ok"]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == done
    assert [b.value for b in buckets] == sorted(b.value for b in buckets), "cumulative buckets"


def _ok_before(families: dict[str, list[Any]]) -> float:
    try:
        return _value(families, "broker_worker_jobs_total", task="speech", outcome="ok")
    except AssertionError:
        return 0.0


def test_render_escapes_labels_and_bounds_tasks() -> None:
    class State:
        running, waiting = 0, 0

        def readiness(self) -> tuple[int, dict[str, Any]]:
            return 503, {}

    m = WorkerMetrics(buckets=(1.0,))
    m.observe_job('we"ird\n', "ok", 2.0)
    text = m.render(State(), slots=2, max_waiting=0)
    fam = {f.name: f for f in parser.text_string_to_metric_families(text)}
    assert fam["broker_worker_ready"].samples[0].value == 0
    sample = next(s for s in fam["broker_worker_job_seconds"].samples if s.labels.get("le") == "1")
    assert sample.labels["task"] == 'we"ird\n' and sample.value == 0
