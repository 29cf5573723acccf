"""The Replicate adapter end to end: adapter → emulator (hosted /v1 API) → the real Cog runtime."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import numpy as np
import pytest
from pydantic import SecretStr

from broker import engines, wire
from broker.errors import (
    AuthenticationFailed,
    BrokerError,
    ConfigurationError,
    EngineUnavailable,
    InvalidRequest,
    JobFailed,
    ProviderUnavailable,
    RateLimited,
)
from broker.media import Audio, Video
from broker.providers import registry
from broker.providers.base import JobState
from broker.providers.replicate import ReplicateProvider
from broker.settings import Settings
from broker.types import RenderRequest, Segment, SpeechRequest, build
from tests.replicate_support import TOKEN, emulator, provider

pytestmark = pytest.mark.usefixtures("piper_available")

TEXT = "The quick brown fox jumps over the lazy dog. It was not amused."


def _plausible(audio: Audio, text: str) -> None:
    words = len(text.split())
    assert audio.sample_rate == 24_000 and audio.is_finite() and audio.rms() > 0.01
    assert words / 4.0 <= audio.duration_s <= words / 1.5 + 1.0


@pytest.mark.parametrize("target", ["model", "deployment", "version"])
async def test_speech_end_to_end_for_each_target(target: str) -> None:
    with emulator() as server:
        emu = server.emulator
        auth = {"Authorization": f"Bearer {TOKEN}"}
        version = httpx.get(f"{server.url}/v1/models/broker/broker", headers=auth).json()["latest_version"]["id"]
        created = httpx.post(f"{server.url}/v1/deployments", headers=auth, json={
            "name": "speech", "model": "broker/broker", "version": version, "hardware": "gpu-l40s",
            "min_instances": 0, "max_instances": 1})
        assert created.status_code == 201
        overrides = {"model": {"model": "broker/broker"}, "deployment": {"deployment": "broker/speech"},
                     "version": {"version": f"broker/broker:{version}"}}[target]
        p = provider(server, **{"model": None, **overrides})
        job = await p.submit(build(SpeechRequest, text=TEXT))
        audio = await job.result(timeout=60)
        assert isinstance(audio, Audio)
        _plausible(audio, TEXT)
        assert job.state == JobState.SUCCEEDED and "running" in job.timestamps
        assert job.billing is not None and job.billing.run_seconds and job.billing.run_seconds > 0
        # Deployments are private: setup time is billed on top of predict time.
        assert job.billing.billed_seconds >= job.billing.run_seconds
        assert (job.billing.billed_seconds > job.billing.run_seconds) == (target == "deployment")
        record = emu.predictions[job.id]
        assert record.deployment == ("broker/speech" if target == "deployment" else None)
        await p.aclose()


async def test_prefer_wait_finishes_short_jobs_in_one_request() -> None:
    with emulator() as server:
        p = provider(server, wait_s=30)
        job = await p.submit(build(SpeechRequest, text="Short."))
        assert job.state == JobState.SUCCEEDED  # decided from the create response alone
        assert [c[:2] for c in server.emulator.calls] == [("POST", "/v1/models/broker/broker/predictions"),
                                                          ("GET", server.emulator.calls[1][1])]
        assert server.emulator.calls[1][1].startswith("/delivery/")  # only the output download follows


async def test_streaming_yields_chunks_in_order() -> None:
    with emulator() as server:
        p = provider(server)
        chunks = [c async for c in p.astream_speech("One sentence here. A second one. And a third.")]
        assert len(chunks) >= 3
        assert [c.index for c in chunks] == list(range(len(chunks)))
        assert chunks[-1].final and not any(c.final for c in chunks[:-1])
        assert any(path.startswith("/stream/") for _, path, _ in server.emulator.calls)
        # A stream opened after the job finished gives the same chunks, from the downloaded outputs.
        job = await p.submit(build(SpeechRequest, text="One sentence here. A second one. And a third."), stream=True)
        assert await job.wait(60) == JobState.SUCCEEDED
        late = [c async for c in job.stream()]
        assert [c.index for c in late] == [c.index for c in chunks] and late[-1].final


async def test_cancel_stops_the_prediction() -> None:
    with emulator() as server:
        p = provider(server, wait_s=0)
        job = await p.submit(build(SpeechRequest, text=" ".join([TEXT] * 40)))
        for _ in range(100):
            if await job.poll() == JobState.RUNNING:
                break
            await asyncio.sleep(0.05)
        await job.cancel()
        await job.cancel()
        assert job.state == JobState.CANCELLED
        record = server.emulator.predictions[job.id]
        await asyncio.wait_for(record.done.wait(), 30)
        assert record.status == "canceled"


async def test_large_inputs_go_through_the_files_api() -> None:
    noise = Audio((np.random.default_rng(1).standard_normal(24_000 * 12) * 0.1).astype("float32"))
    small = Audio((np.sin(np.arange(24_000) / 5.0) * 0.2).astype("float32"))
    assert len(noise.to_bytes("flac")) > 256 * 1024 > len(small.to_bytes("flac"))
    with emulator() as server:
        p = provider(server)
        request = build(SpeechRequest, text="After the context.", context=[
            Segment(speaker=0, text="A long noisy turn.", audio=noise), Segment(speaker=0, text="Short.", audio=small)])
        audio = await p.arun(request, timeout=60)
        assert audio.duration_s > 0.5
        emu = server.emulator
        [record] = emu.predictions.values()
        files = record.input["files"]
        assert files[0].startswith(f"{server.url}/v1/files/") and files[1].startswith("data:audio/flac;base64,")
        assert len(emu.files) == 1 and ("POST", "/v1/files", 201) in emu.calls


async def test_bad_input_comes_back_as_the_same_typed_error() -> None:
    with emulator() as server:
        p = provider(server)
        with pytest.raises(InvalidRequest) as info:
            await p.arun(build(SpeechRequest, text="Hello", speaker=99), timeout=60)
        assert info.value.field == "speaker"


async def test_render_error_or_video_arrives_intact() -> None:
    """The render engine is being built elsewhere; whatever it gives locally must arrive unchanged."""
    request = build(RenderRequest, text="Hello.")
    local: Video | BrokerError
    try:
        local = engines.render(request)
    except BrokerError as exc:
        local = exc
    with emulator() as server:
        p = provider(server)
        if isinstance(local, Video):
            video = await p.arun(request, timeout=120)
            assert isinstance(video, Video) and video.data[4:8] == b"ftyp" and video.frames > 0
        else:
            with pytest.raises(type(local)) as info:
                await p.arun(request, timeout=120)
            assert info.value.message == local.message
            if isinstance(local, EngineUnavailable):
                assert "render" in local.message


async def test_rate_limit_is_retried_then_reported() -> None:
    with emulator() as server:
        emu = server.emulator
        emu.faults.update(rate_limit_burst=1, retry_after_s=1)
        p = provider(server, wait_s=30)
        started = time.monotonic()
        job = await p.submit(build(SpeechRequest, text="Throttled once."))
        assert time.monotonic() - started >= 1.0  # waited out Retry-After
        assert [c[2] for c in emu.calls[:2]] == [429, 201]
        assert job.state == JobState.SUCCEEDED
        emu.faults.update(rate_limit_burst=5, retry_after_s=30)
        with pytest.raises(RateLimited) as info:
            await p.submit(build(SpeechRequest, text="Throttled for long."))
        assert info.value.retry_after == 30.0 and info.value.retryable


async def test_stuck_in_starting_times_out_and_is_cancelled() -> None:
    with emulator() as server:
        server.emulator.faults.update(stuck=True)
        p = provider(server, wait_s=0, queue_timeout_s=0.5)
        job = await p.submit(build(SpeechRequest, text="Nobody will run me."))
        with pytest.raises(ProviderUnavailable, match="still starting"):
            await job.result(timeout=20)
        assert server.emulator.predictions[job.id].status == "canceled"
        # A stream waits on the same clock instead of hanging on a silent event stream.
        with pytest.raises(ProviderUnavailable, match="still starting"):
            _ = [c async for c in p.astream_speech("Nobody will stream me.")]


async def test_failed_prediction_is_job_failed() -> None:
    with emulator() as server:
        server.emulator.faults.update(fail_rate=1.0)
        p = provider(server)
        with pytest.raises(JobFailed, match="emulated fault") as info:
            await p.arun(build(SpeechRequest, text="I will fail."), timeout=30)
        assert info.value.retryable


async def test_slow_setup_keeps_the_job_queued_then_runs() -> None:
    with emulator() as server:
        server.emulator.faults.update(setup_delay_s=1.5)
        p = provider(server, wait_s=0)
        job = await p.submit(build(SpeechRequest, text="Cold start."))
        await asyncio.sleep(0.5)
        assert await job.poll() == JobState.QUEUED
        assert isinstance(await job.result(timeout=60), Audio)
        assert job.seconds_in(JobState.QUEUED) and job.seconds_in(JobState.QUEUED) >= 1.0


async def test_wrong_token_and_unknown_target() -> None:
    with emulator() as server:
        with pytest.raises(AuthenticationFailed) as info:
            await provider(server, api_token="r8_wrong").submit(build(SpeechRequest, text="hi"))
        assert not info.value.retryable and info.value.status_code == 401
        with pytest.raises(ProviderUnavailable, match="deploy"):
            await provider(server, model=None, deployment="broker/missing").submit(build(SpeechRequest, text="hi"))
        health = await provider(server, model=None, deployment="broker/missing").health()
        assert not health.ok
        assert (await provider(server).health()).ok


def test_configuration_errors_before_any_call() -> None:
    with pytest.raises(ConfigurationError, match="REPLICATE_API_TOKEN"):
        registry.create("replicate", Settings())
    with pytest.raises(ConfigurationError, match="deployment, model or version"):
        ReplicateProvider(api_token="x")
    with pytest.raises(ConfigurationError, match="owner/name"):
        ReplicateProvider(api_token="x", deployment="no-slash")
    settings = Settings(replicate={"api_token": "x", "deployment": "me/speech", "model": "me/model"})
    p = registry.create("replicate", settings)
    assert isinstance(p, ReplicateProvider) and p.target == "deployment me/speech" and p.private


async def test_token_never_appears_in_reprs_errors_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with emulator() as server:
        p = provider(server, api_token=SecretStr(TOKEN))
        settings = Settings(replicate={"api_token": TOKEN, "model": "broker/broker"})
        texts = [repr(p), repr(server.emulator), repr(settings), str(settings.redacted())]
        job = await p.submit(build(SpeechRequest, text="Secret test."))
        await job.result(timeout=60)
        texts.append(repr(job))
        server.emulator.faults.update(outage=True)
        for failing in (p, provider(server, api_token="r8_wrong")):
            try:
                await failing.submit(build(SpeechRequest, text="fail"))
            except BrokerError as exc:
                texts += [str(exc), repr(exc), str(exc.to_dict())]
    texts.append(caplog.text)
    assert not [t for t in texts if TOKEN in t]
    assert any("503" in t for t in texts)


def test_sync_twin_works_outside_an_event_loop() -> None:
    with emulator() as server:
        p = provider(server)
        audio = p.generate_speech("Synchronous call.")
        assert isinstance(audio, Audio) and audio.rms() > 0.01
        assert wire.decode_result(wire.encode_speech_result("x", audio)).duration_s == audio.duration_s
