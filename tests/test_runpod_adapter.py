"""RunPodProvider against the loopback emulator's real HTTP routes.

A scripted worker speaks the worker queue (job-take / job-done / job-stream / job-stop) exactly as
the runpod SDK does, so each lifecycle case is quick and deterministic; test_runpod_e2e.py runs the
real SDK worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from broker import wire
from broker.errors import (
    AuthenticationFailed,
    ConfigurationError,
    InvalidRequest,
    JobFailed,
    JobLost,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from broker.media import Audio
from broker.providers.base import JobState
from broker.providers.runpod import RunPodJob, RunPodProvider, decode_output, runpod_error
from broker.settings import Settings
from broker.testing.runpod_emulator import RunPodEmulator
from broker.types import RenderRequest, Segment, SpeechRequest

PNG = b"\x89PNG\r\n\x1a\n"


class ScriptedWorker:
    """Plays the SDK worker's side of the queue, with the SDK's URLs, auth and body encoding."""

    def __init__(self, emu: RunPodEmulator, worker_id: str = "scripted-1") -> None:
        env = emu.worker_environment(worker_id)
        self.take_url = env["RUNPOD_WEBHOOK_GET_JOB"].replace("$ID", worker_id)
        self.done_url = env["RUNPOD_WEBHOOK_POST_OUTPUT"].replace("$RUNPOD_POD_ID", worker_id)
        self.stream_url = env["RUNPOD_WEBHOOK_POST_STREAM"].replace("$RUNPOD_POD_ID", worker_id)
        self.stop_url = self.take_url.replace("/job-take/", "/job-stop/")
        self.headers = {"Authorization": env["RUNPOD_AI_API_KEY"]}

    def take(self) -> dict[str, Any]:
        resp = httpx.get(self.take_url + "&job_in_progress=0", headers=self.headers, timeout=30)
        assert resp.status_code == 200, resp.status_code
        job: dict[str, Any] = resp.json()
        return job

    def _post(self, template: str, job_id: str, body: dict[str, Any], stream: bool = False) -> None:
        url = template.replace("$ID", job_id) + f"&isStream={'true' if stream else 'false'}"
        resp = httpx.post(url, content=json.dumps(body), headers={
            **self.headers, "Content-Type": "application/x-www-form-urlencoded"})
        assert resp.status_code == 200

    def done(self, job_id: str, body: dict[str, Any], stream: bool = False) -> None:
        self._post(self.done_url, job_id, body, stream)

    def progress(self, job_id: str, value: Any) -> None:
        self._post(self.done_url, job_id, {"status": "IN_PROGRESS", "output": value})

    def stream(self, job_id: str, output: Any) -> None:
        self._post(self.stream_url, job_id, {"output": output})

    def stops(self) -> list[str]:
        resp = httpx.get(self.stop_url, headers=self.headers, timeout=30)
        return list(resp.json()["jobsToStop"]) if resp.status_code == 200 else []


def tone(seconds: float = 0.5, hz: float = 220.0) -> Audio:
    t = np.arange(int(24_000 * seconds)) / 24_000
    return Audio(0.3 * np.sin(2 * np.pi * hz * t).astype(np.float32))


@pytest.fixture(scope="module")
def emu() -> Iterator[RunPodEmulator]:
    with RunPodEmulator(worker=False, long_poll_s=5) as emulator:
        yield emulator


@pytest.fixture(autouse=True)
def _clean(emu: RunPodEmulator) -> Iterator[None]:
    yield
    emu.set_faults(stuck=False, failure_rate=0.0, rate_limit_burst=0, reject_auth=False, ttl_s=None,
                   result_retention_s=None)
    emu._call(_purge(emu))


async def _purge(emu: RunPodEmulator) -> None:
    emu.book.purge()


@pytest.fixture()
def worker(emu: RunPodEmulator) -> ScriptedWorker:
    return ScriptedWorker(emu)


def provider(emu: RunPodEmulator, **kw: Any) -> RunPodProvider:
    kw.setdefault("queue_timeout_s", None)
    return RunPodProvider(emu.endpoint_id, emu.api_key, base_url=emu.base_url, **kw)


async def wait_state(job: RunPodJob, state: JobState, timeout: float = 10) -> None:
    async def until() -> None:
        while (await job.poll()) != state:
            await asyncio.sleep(0.02)

    await asyncio.wait_for(until(), timeout)


async def test_lifecycle_policy_progress_result_and_billing(emu: RunPodEmulator, worker: ScriptedWorker) -> None:
    rp = provider(emu, execution_timeout_s=120, ttl_s=900)
    job = await rp.submit(SpeechRequest(text="Hello there."))
    assert isinstance(job, RunPodJob) and job.state == JobState.QUEUED
    taken = await asyncio.to_thread(worker.take)
    assert taken["id"] == job.id
    assert taken["input"]["v"] == 1 and taken["input"]["task"] == "speech"
    assert taken["input"]["input"]["text"] == "Hello there."
    sent = emu.book.jobs[job.id]
    assert (sent.execution_timeout_s, sent.ttl_s) == (120.0, 900.0)  # policy travelled in ms

    await asyncio.to_thread(worker.progress, job.id, {"progress": 0.5})
    await wait_state(job, JobState.RUNNING)
    await job.poll()
    assert job.progress == {"progress": 0.5}

    audio = tone()
    await asyncio.to_thread(worker.done, job.id, {"output": wire.encode_speech_result(job.id, audio)})
    out = await job.result(timeout=10)
    assert isinstance(out, Audio) and abs(out.duration_s - 0.5) < 0.01
    assert np.allclose(out.samples, audio.samples, atol=1e-3)
    assert job.billing is not None and job.billing.estimated
    assert job.billing.hardware == "A100-80GB" and job.billing.run_seconds is not None
    assert job.billing.billed_seconds >= 0 and job.billing.queue_seconds is not None
    assert job.seconds_in(JobState.QUEUED) is not None
    await rp.aclose()


async def test_default_ttl_covers_queue_and_execution(emu: RunPodEmulator) -> None:
    rp = provider(emu, queue_timeout_s=30, execution_timeout_s=300)
    assert rp.policy() == {"executionTimeout": 300_000, "ttl": 390_000}
    assert provider(emu, execution_timeout_s=1, ttl_s=1).policy() == {"executionTimeout": 5_001, "ttl": 10_000}


async def test_typed_error_from_handler_survives(emu: RunPodEmulator, worker: ScriptedWorker) -> None:
    rp = provider(emu)
    job = await rp.submit(SpeechRequest(text="Hi", speaker=7))
    taken = await asyncio.to_thread(worker.take)
    err = {"type": "InvalidRequest", "code": "invalid_request", "field": "speaker", "message": "speaker: unknown"}
    await asyncio.to_thread(worker.done, taken["id"], {"error": json.dumps(err)})
    with pytest.raises(InvalidRequest) as info:
        await job.result(timeout=10)
    assert info.value.field == "speaker" and job.state == JobState.FAILED


async def test_sdk_handler_exception_is_readable(emu: RunPodEmulator) -> None:
    emu.set_faults(failure_rate=1.0)
    rp = provider(emu)
    job = await rp.submit(SpeechRequest(text="Hi"))
    scripted = ScriptedWorker(emu, "scripted-2")

    def poll_once() -> None:  # the failed job is not handed out, so the long-poll keeps waiting
        try:
            httpx.get(scripted.take_url + "&job_in_progress=0", headers=scripted.headers, timeout=1)
        except httpx.ReadTimeout:
            pass

    take = asyncio.create_task(asyncio.to_thread(poll_once))
    with pytest.raises(JobFailed) as info:
        await job.result(timeout=10)
    assert "RuntimeError" in info.value.message and "emulated handler failure" in info.value.message
    assert "Traceback" not in info.value.message
    await take


async def test_cold_start_shows_as_queue_delay(emu: RunPodEmulator) -> None:
    emu.set_faults(cold_start_s=0.6)
    try:
        job = await provider(emu).submit(SpeechRequest(text="Hi"))
        fresh = ScriptedWorker(emu, "scripted-cold")  # a worker that appears now pays the cold start
        taken = await asyncio.to_thread(fresh.take)
        await asyncio.to_thread(fresh.done, taken["id"], {"output": wire.encode_speech_result(job.id, tone())})
        await job.result(timeout=10)
    finally:
        emu.set_faults(cold_start_s=0.0)
    assert job.billing is not None and job.billing.queue_seconds is not None
    assert job.billing.queue_seconds >= 0.6


def test_error_field_parsing() -> None:
    gen = runpod_error("handler: boom \ntraceback: Traceback (most recent call last): ...")
    assert isinstance(gen, JobFailed) and gen.message == "RunPod job failed: handler: boom"
    assert isinstance(runpod_error('{"type": "ProviderTimeout", "message": "slow"}'), ProviderTimeout)
    assert "FAILED without" in runpod_error(None).message
    assert "oops" in runpod_error("oops").message


def test_aggregate_stream_output_decodes() -> None:
    a, b = tone(0.2), tone(0.3, 330)
    chunks = [wire.encode_chunk("j", 1, b, final=True), wire.encode_chunk("j", 0, a, final=False)]
    out = decode_output(chunks)
    assert isinstance(out, Audio) and abs(out.duration_s - 0.5) < 0.01
    single = decode_output([wire.encode_speech_result("j", a)])
    assert isinstance(single, Audio) and abs(single.duration_s - 0.2) < 0.01


async def test_stream_chunks_then_result(emu: RunPodEmulator, worker: ScriptedWorker) -> None:
    rp = provider(emu)
    job = await rp.submit(SpeechRequest(text="One. Two."), stream=True)
    assert job.request.task == "speech" and isinstance(job, RunPodJob) and job.streaming
    taken = await asyncio.to_thread(worker.take)
    assert taken["input"]["stream"] is True
    parts = [tone(0.2), tone(0.3, 330)]

    async def produce() -> None:
        chunks = [wire.encode_chunk(job.id, i, p, final=i == 1) for i, p in enumerate(parts)]
        for c in chunks:
            await asyncio.sleep(0.05)
            await asyncio.to_thread(worker.stream, job.id, c)
        await asyncio.to_thread(worker.done, job.id, {"output": chunks}, True)

    producer = asyncio.create_task(produce())
    got = [c async for c in job.stream()]
    await producer
    assert [c.index for c in got] == [0, 1] and [c.final for c in got] == [False, True]
    assert abs(got[1].audio.duration_s - 0.3) < 0.01
    assert job.state == JobState.SUCCEEDED and isinstance(job.output, Audio)
    assert abs(job.output.duration_s - 0.5) < 0.01


async def test_stream_from_plain_handler_is_one_chunk(emu: RunPodEmulator, worker: ScriptedWorker) -> None:
    rp = provider(emu)
    job = await rp.submit(SpeechRequest(text="Hi."), stream=True)
    taken = await asyncio.to_thread(worker.take)
    await asyncio.to_thread(worker.done, taken["id"], {"output": wire.encode_speech_result(job.id, tone())})
    got = [c async for c in job.stream()]
    assert len(got) == 1 and got[0].final and abs(got[0].audio.duration_s - 0.5) < 0.01


async def test_status_404_is_job_lost(emu: RunPodEmulator) -> None:
    rp = provider(emu)
    job = await rp.submit(SpeechRequest(text="Hi"))
    assert await rp.purge_queue() == 1
    with pytest.raises(JobLost):
        await job.result(timeout=5)
    assert job.state == JobState.LOST


async def test_wrong_key_is_authentication_failed(emu: RunPodEmulator) -> None:
    rp = RunPodProvider(emu.endpoint_id, "not-the-key", base_url=emu.base_url)
    with pytest.raises(AuthenticationFailed) as info:
        await rp.submit(SpeechRequest(text="Hi"))
    assert not info.value.retryable and info.value.status_code == 401
    report = await rp.health()
    assert not report.ok and "API key" in report.detail


async def test_429_burst_on_submit_and_during_polling(emu: RunPodEmulator, worker: ScriptedWorker) -> None:
    rp = provider(emu)
    emu.set_faults(rate_limit_burst=1, retry_after_s=2.5)
    with pytest.raises(RateLimited) as info:
        await rp.submit(SpeechRequest(text="Hi"))
    assert info.value.retry_after == 2.5 and info.value.retryable
    job = await rp.submit(SpeechRequest(text="Hi"))
    taken = await asyncio.to_thread(worker.take)
    await asyncio.to_thread(worker.done, taken["id"], {"output": wire.encode_speech_result(job.id, tone())})
    emu.set_faults(rate_limit_burst=2, retry_after_s=0.1)  # absorbed by the poll loop
    assert isinstance(await job.result(timeout=10), Audio)


async def test_queue_timeout_cancels_and_reports_unavailable(emu: RunPodEmulator) -> None:
    rp = provider(emu, queue_timeout_s=0.3)
    assert rp.queue_timeout_s == 0.3
    job = await rp.submit(SpeechRequest(text="Hi"))
    with pytest.raises(ProviderUnavailable) as info:
        await job.result(timeout=10)
    assert "queue" in info.value.message
    assert emu.job(job.id)["status"] == "CANCELLED"  # it can never start (and bill) later


async def test_ttl_expiry_in_queue(emu: RunPodEmulator) -> None:
    emu.set_faults(ttl_s=0.2)
    job = await provider(emu).submit(SpeechRequest(text="Hi"))
    with pytest.raises(ProviderUnavailable, match="expired in RunPod's queue: its ttl"):
        await job.result(timeout=10)


async def test_execution_timeout_stops_the_worker(emu: RunPodEmulator, worker: ScriptedWorker) -> None:
    job = await provider(emu).submit(SpeechRequest(text="Hi"))
    taken = await asyncio.to_thread(worker.take)
    await wait_state(job, JobState.RUNNING)
    emu.set_faults(ttl_s=0.1)
    with pytest.raises(ProviderTimeout) as info:
        await job.result(timeout=10)
    assert await asyncio.to_thread(worker.stops) == [taken["id"]]
    # the ttl ran out, not the 600 s execution timeout: the message says which
    assert "ttl" in info.value.message and "not its execution timeout" in info.value.message


async def test_cancel_is_idempotent_and_reaches_the_worker(emu: RunPodEmulator, worker: ScriptedWorker) -> None:
    job = await provider(emu).submit(SpeechRequest(text="Hi"))
    taken = await asyncio.to_thread(worker.take)
    await job.cancel()
    await job.cancel()
    assert job.state == JobState.CANCELLED and emu.job(job.id)["status"] == "CANCELLED"
    assert await asyncio.to_thread(worker.stops) == [taken["id"]]
    # a late result from the stopped worker is dropped
    await asyncio.to_thread(worker.done, taken["id"], {"output": wire.encode_speech_result(job.id, tone())})
    assert emu.job(job.id)["status"] == "CANCELLED"


async def test_health_reports_workers_and_queue(emu: RunPodEmulator) -> None:
    rp = provider(emu)
    await rp.submit(SpeechRequest(text="Hi"))
    report = await rp.health()
    assert report.ok and report.info["jobs_in_queue"] == 1
    assert {"workers_idle", "workers_running", "jobs_in_progress"} <= set(report.info)
    assert report.latency_s is not None


def _big_render(megabytes: float) -> RenderRequest:
    return RenderRequest(text="Hi", avatar=PNG + os.urandom(int(megabytes * 1e6)))


async def test_payload_over_20mb_is_refused_before_sending(emu: RunPodEmulator) -> None:
    before = len(emu.book.jobs)
    with pytest.raises(InvalidRequest, match="at most 20 MB"):
        await provider(emu).submit(_big_render(15.5))
    with pytest.raises(InvalidRequest, match="at most 10 MB"):
        await provider(emu).submit(SpeechRequest(
            text="Hi", context=[Segment(0, "x", np.random.default_rng(0).uniform(-1, 1, 24_000 * 170))]),
            stream=True)
    assert len(emu.book.jobs) == before


async def test_payload_between_10_and_20mb_goes_through_runsync(emu: RunPodEmulator) -> None:
    rp = provider(emu, runsync_max_s=1.0)
    job = await rp.submit(_big_render(8.0))
    assert job.id.startswith("sync-") and job.state == JobState.QUEUED
    await job.cancel()


async def test_large_media_travel_by_url_with_an_uploader(emu: RunPodEmulator, worker: ScriptedWorker) -> None:
    async def upload(data: bytes, mime: str) -> str:
        async with httpx.AsyncClient() as client:
            resp = await client.put(f"{emu.root_url}/_emulator/files/avatar", content=data,
                                    headers={"Authorization": f"Bearer {emu.api_key}", "Content-Type": mime})
            return str(resp.json()["url"])

    request = _big_render(16.0)
    job = await provider(emu, uploader=upload).submit(request)
    assert not job.id.startswith("sync-")
    taken = await asyncio.to_thread(worker.take)
    avatar = taken["input"]["input"]["avatar"]
    assert "b64" not in avatar
    assert httpx.get(avatar["url"]).content == request.avatar
    await job.cancel()


async def test_runsync_fast_path(emu: RunPodEmulator, worker: ScriptedWorker) -> None:
    rp = provider(emu, use_runsync=True, runsync_max_s=5.0)

    async def serve() -> None:
        taken = await asyncio.to_thread(worker.take)
        await asyncio.to_thread(worker.done, taken["id"], {"output": wire.encode_speech_result("x", tone())})

    server = asyncio.create_task(serve())
    job = await rp.submit(SpeechRequest(text="Hi."))
    await server
    assert job.id.startswith("sync-") and job.state == JobState.SUCCEEDED  # done in one round trip


def test_from_settings(emu: RunPodEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match=r"endpoint id.*API key"):
        RunPodProvider.from_settings(Settings())
    for key, value in emu.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("BROKER_RUNPOD__QUEUE_TIMEOUT_S", "7")
    rp = RunPodProvider.from_settings(Settings())
    assert (rp.endpoint_id, rp.base_url, rp.queue_timeout_s) == (emu.endpoint_id, emu.base_url, 7.0)


async def test_api_key_never_shows(emu: RunPodEmulator, monkeypatch: pytest.MonkeyPatch,
                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("RUNPOD_API_KEY", emu.api_key)
    monkeypatch.setenv("BROKER_RUNPOD__ENDPOINT_ID", emu.endpoint_id)
    settings = Settings()
    rp = RunPodProvider.from_settings(settings, base_url=emu.base_url)
    job = await rp.submit(SpeechRequest(text="Hi"))
    emu.set_faults(reject_auth=True)
    with pytest.raises(AuthenticationFailed) as info:
        await job.result(timeout=5)
    texts = [repr(rp), str(rp.__dict__), repr(settings), str(settings.redacted()), str(info.value),
             json.dumps(info.value.to_dict()), caplog.text, repr(job)]
    assert all(emu.api_key not in t for t in texts)
