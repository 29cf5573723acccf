"""A pool of three real `broker worker serve` processes behind one `http` endpoint.

Jobs are spread by each worker's own `/ready` queue depth; a worker killed (SIGKILL) mid-run loses
nothing: its in-flight jobs are sent again to the other two and every job succeeds.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from broker import wire
from broker.media import Audio
from broker.providers.base import JobState
from broker.providers.http import HTTPProvider
from broker.settings import HTTPWorkerSettings, Settings
from broker.types import SpeechRequest, build

pytestmark = [pytest.mark.usefixtures("piper_available"), pytest.mark.slow]

KEY = "pool-key-5d1e"
LONG_TEXT = " ".join(f"This is sentence number {i} of a long chapter that takes a while to read." for i in range(40))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    url: str

    def ready_info(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/ready", timeout=5).json())


def _start_worker() -> Worker:
    port = _free_port()
    env = {**os.environ, "BROKER_WORKER_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "broker", "worker", "serve", "--port", str(port),
                             "--concurrency", "1", "--lazy-render", "--log-level", "warning"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Worker(proc, f"http://127.0.0.1:{port}")


def _wait_ready(workers: list[Worker], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    pending = list(workers)
    while pending:
        for w in list(pending):
            assert w.proc.poll() is None, f"worker at {w.url} exited with {w.proc.returncode}"
            try:
                if w.ready_info()["ready"]:
                    pending.remove(w)
            except httpx.HTTPError:
                pass  # not listening yet
        assert time.monotonic() < deadline, "workers did not get ready"
        if pending:
            time.sleep(0.1)


@pytest.fixture(scope="module")
def workers() -> Iterator[list[Worker]]:
    started = [_start_worker() for _ in range(3)]
    try:
        _wait_ready(started)
        yield started
    finally:
        for w in started:
            if w.proc.poll() is None:
                w.proc.terminate()
        for w in started:
            try:
                w.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait(timeout=10)


async def _until(check: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def _first_hops(provider: HTTPProvider) -> Counter[str]:
    return Counter(route[0] for route in provider.pool.routes.values())


async def test_pool_avoids_the_worker_with_the_longest_queue(workers: list[Worker]) -> None:
    busy, quiet = workers[0], workers[1:]
    payload = wire.encode_request(build(SpeechRequest, text=LONG_TEXT))
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(timeout=120) as other_client:
        # Another client (another broker process, say) has four long jobs on the first worker.
        load = [asyncio.ensure_future(other_client.post(f"{busy.url}/run", json=payload, headers=headers))
                for _ in range(4)]
        await _until(lambda: (i := busy.ready_info())["running"] + i["waiting"] == 4)
        async with HTTPProvider(urls=[w.url for w in workers], api_key=KEY) as provider:
            jobs = [await provider.submit(build(SpeechRequest, text=f"Quick job {n}.")) for n in range(8)]
            outputs = await asyncio.gather(*(j.result(timeout=120) for j in jobs))
            assert all(isinstance(o, Audio) and o.rms() > 0.01 for o in outputs)
            hops = _first_hops(provider)
            # Depths 4 / 0 / 0: the eight jobs fill the two quiet workers up to the busy one's depth.
            assert hops[busy.url] == 0
            assert hops[quiet[0].url] == 4 and hops[quiet[1].url] == 4
        for task in load:
            task.cancel()
        await asyncio.gather(*load, return_exceptions=True)
    await _until(lambda: (i := busy.ready_info())["running"] == 0 and i["waiting"] == 0)


async def test_thirty_jobs_spread_and_a_worker_killed_mid_run_loses_none(workers: list[Worker]) -> None:
    victim = workers[1]
    survivors = [workers[0], workers[2]]
    served_before = {w.url: w.ready_info()["served"] for w in workers}
    async with HTTPProvider(urls=[w.url for w in workers], api_key=KEY) as provider:
        jobs = [await provider.submit(build(SpeechRequest, text=f"Pool job number {n}.")) for n in range(30)]
        # Kill the victim once it has finished a couple of its jobs and still has more queued.
        await _until(lambda: (i := victim.ready_info())["served"] - served_before[victim.url] >= 2
                     and i["waiting"] >= 1)
        victim.proc.kill()
        victim.proc.wait(timeout=10)
        outputs = await asyncio.gather(*(j.result(timeout=180) for j in jobs))

        assert all(j.state == JobState.SUCCEEDED for j in jobs), [j.error for j in jobs if j.error]
        assert all(isinstance(o, Audio) and o.rms() > 0.01 for o in outputs)
        assert len({j.id for j in jobs}) == 30
        routes = provider.pool.routes
        assert set(routes) == {j.id for j in jobs}
        hops = _first_hops(provider)
        assert sorted(hops.values()) == [10, 10, 10], f"spread by queue depth: {hops}"
        retried = [r for r in routes.values() if r[0] == victim.url and len(r) > 1]
        assert retried, "the victim's queued jobs were sent again"
        assert all(r[-1] in {s.url for s in survivors} for r in retried)
        finished_on_victim = sum(1 for r in routes.values() if r[-1] == victim.url)
        assert finished_on_victim >= 2
        assert finished_on_victim + len(retried) == hops[victim.url]
        # Every job ran to the end exactly once where it finished: the survivors served all the rest.
        served = sum(s.ready_info()["served"] - served_before[s.url] for s in survivors)
        assert served == 30 - finished_on_victim
        health = await provider.health()
        assert health.ok, "two of three workers still serve"
        states = {w["url"]: w["ready"] for w in health.info["workers"]}
        assert states[victim.url] is False and all(states[s.url] for s in survivors)


def test_pool_settings_and_machines() -> None:
    cfg = HTTPWorkerSettings(urls=["http://a:8000", "http://b:8000"], usd_per_hour=0.66)
    assert cfg.always_on_machines == 2
    assert HTTPWorkerSettings(url="http://lb:8000", machines=5).always_on_machines == 5
    provider = HTTPProvider.from_settings(Settings(http=cfg))
    assert [m.url for m in provider.pool.pool.members] == ["http://a:8000", "http://b:8000"]
    assert "a:8000" in repr(provider) and "b:8000" in repr(provider)
    provider.close()
