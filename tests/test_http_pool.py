"""The `http` provider's pool against a real worker on loopback and addresses where nothing listens."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from broker.errors import ProviderUnavailable
from broker.media import Audio
from broker.providers.http import HTTPProvider
from broker.routing.manager import CloudGPUManager
from broker.settings import Settings
from broker.testing.asgi_server import LoopbackServer
from broker.types import Segment, SpeechRequest, build
from broker.worker.server import MiB, create_app

pytestmark = pytest.mark.usefixtures("piper_available")

KEY = "pool-unit-key-33"


def _closed_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def worker() -> Iterator[LoopbackServer]:
    with LoopbackServer(create_app(api_key=KEY, preload_render=False, max_body_bytes=1 * MiB)) as server:
        deadline = time.monotonic() + 120
        while not httpx.get(f"{server.url}/ready").json()["ready"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield server


async def test_a_dead_address_in_the_pool_is_skipped_and_avoided(worker: LoopbackServer) -> None:
    dead = _closed_url()
    async with HTTPProvider(urls=[dead, worker.url], api_key=KEY, connect_timeout_s=2) as provider:
        health = await provider.health()
        assert health.ok, "one ready worker is enough"
        assert [w["ready"] for w in health.info["workers"]] == [False, True]
        for n in range(3):
            audio = await provider.agenerate_speech(f"Job {n} of the pool.")
            assert isinstance(audio, Audio) and audio.rms() > 0.01
        routes = list(provider.pool.routes.values())
        assert all(r == [worker.url] for r in routes), "the dead address is ejected once /ready fails"


async def test_a_job_sent_to_a_dead_worker_fails_over_inside_the_pool(worker: LoopbackServer) -> None:
    dead = _closed_url()
    async with HTTPProvider(urls=[dead, worker.url], api_key=KEY, connect_timeout_s=2) as provider:
        provider.pool.pool.refresh_s = 3600.0

        def stale_view_all_ready() -> None:  # as if /ready had been read just before the worker died
            for member in provider.pool.pool.members:
                member.reported_at, member.reported_depth = time.monotonic(), 0
                member.ready, member.down_until = True, 0.0

        stale_view_all_ready()
        job = await provider.submit(build(SpeechRequest, text="Goes to the dead worker first."))
        audio = await job.result(timeout=60)
        assert audio.rms() > 0.01
        assert provider.pool.routes[job.id] == [dead, worker.url]
        stale_view_all_ready()
        streamed = await provider.submit(build(SpeechRequest, text="A stream. That starts over. Before any chunk."),
                                         stream=True)
        chunks = [c async for c in streamed.stream()]
        assert chunks[-1].final and len(chunks) >= 3 and [c.index for c in chunks] == list(range(len(chunks)))
        assert provider.pool.routes[streamed.id] == [dead, worker.url]


async def test_what_would_fail_anywhere_is_not_retried_in_the_pool(worker: LoopbackServer) -> None:
    other = LoopbackServer(create_app(api_key=KEY, preload_render=False, max_body_bytes=1 * MiB)).start()
    try:
        async with HTTPProvider(urls=[worker.url, other.url], api_key=KEY) as provider:
            noise = np.random.default_rng(1).uniform(-0.5, 0.5, 24_000 * 30).astype(np.float32)
            job = await provider.submit(build(SpeechRequest, text="hi",
                                              context=[Segment(speaker=0, text="noise", audio=noise)]))
            with pytest.raises(ProviderUnavailable) as big:
                await job.result(timeout=60)
            assert big.value.status_code == 413
            assert len(provider.pool.routes[job.id]) == 1, "every worker has the same body limit"
    finally:
        other.stop()


def test_the_manager_fails_over_when_the_whole_pool_is_down() -> None:
    settings = Settings()
    settings.manager.attempts_per_provider = 1
    pool = HTTPProvider(urls=[_closed_url(), _closed_url()], api_key=KEY, connect_timeout_s=2)
    manager = CloudGPUManager([pool, "local"], settings=settings)
    try:
        audio = manager.generate_speech("Nobody in the pool answers.", return_tensor=False)
        report = manager.last_report
        assert report is not None and report.provider == "local" and audio.rms() > 0.01
        assert [(a.provider, a.outcome) for a in report.attempts] == [("http", "failed"), ("local", "succeeded")]
        assert report.attempts[0].error_class == "ProviderUnavailable"
        [route] = pool.pool.routes.values()
        assert len(route) == 2, "both workers were tried before the manager moved on"
    finally:
        manager.close()


async def test_routes_are_remembered_for_recent_jobs_only() -> None:
    from broker.providers.http_pool import ROUTES_KEPT

    async with HTTPProvider(urls=[_closed_url()]) as provider:
        provider.pool.pool.refresh_s = 3600.0
        provider.pool.pool.members[0].reported_at = time.monotonic()
        for n in range(ROUTES_KEPT + 5):
            await provider.pool._next(f"job-{n}", set(), None)
        assert len(provider.pool.routes) == ROUTES_KEPT
        assert next(iter(provider.pool.routes)) == "job-5", "the oldest are dropped first"
