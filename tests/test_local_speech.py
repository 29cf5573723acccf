"""The embedded default engine (Piper) through the local provider, the manager and the drop-in generator."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from broker import wire
from broker.errors import InvalidRequest
from broker.media import SAMPLE_RATE, Audio
from broker.providers.base import JobState
from broker.providers.local import LocalProvider
from broker.routing.manager import CloudGPUManager
from broker.types import SpeechRequest, build
from broker.worker import handle, handle_stream

pytestmark = pytest.mark.usefixtures("piper_available")

TEXT = "The quick brown fox jumps over the lazy dog. It was not amused, and it said so."


def _plausible(audio: Audio, text: str) -> None:
    words = len(text.split())
    assert audio.sample_rate == SAMPLE_RATE
    assert audio.is_finite()
    assert audio.rms() > 0.01, "audio is silent"
    # English speech runs 1.5 to 4 words a second
    assert words / 4.0 <= audio.duration_s <= words / 1.5 + 1.0


async def test_local_provider_job_lifecycle() -> None:
    provider = LocalProvider()
    job = await provider.submit(build(SpeechRequest, text=TEXT))
    assert job.state in (JobState.QUEUED, JobState.RUNNING)
    audio = await job.result(timeout=120)
    assert isinstance(audio, Audio)
    _plausible(audio, TEXT)
    assert job.state == JobState.SUCCEEDED and "running" in job.timestamps
    assert job.billing is not None and job.billing.billed_seconds > 0
    # speech does not load Piper's alignments (renders ask for them: tests/test_startup.py)
    assert not audio.phonemes


async def test_cancel_is_idempotent_and_stops_the_job() -> None:
    provider = LocalProvider()
    job = await provider.submit(build(SpeechRequest, text=" ".join([TEXT] * 20)))
    await asyncio.sleep(0.05)
    await job.cancel()
    await job.cancel()
    assert job.state == JobState.CANCELLED


async def test_streaming_yields_sentences_in_order() -> None:
    provider = LocalProvider()
    chunks = [c async for c in provider.astream_speech("One sentence here. A second one. And a third.")]
    assert len(chunks) >= 3
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert chunks[-1].final and not any(c.final for c in chunks[:-1])


async def test_unknown_speaker_rejected_before_running() -> None:
    provider = LocalProvider()
    with pytest.raises(InvalidRequest) as info:
        await provider.submit(build(SpeechRequest, text="hi", speaker=7))
    assert info.value.field == "speaker"


def test_max_length_truncates_like_csm() -> None:
    audio = LocalProvider().generate_speech(TEXT, max_length_ms=1000)
    assert abs(audio.duration_s - 1.0) < 0.02


def test_worker_handle_speech_and_errors() -> None:
    payload = wire.encode_request(build(SpeechRequest, text="Hello from the worker."), job_id="abc")
    result = handle(payload)
    assert result["ok"] and result["id"] == "abc"
    audio = wire.decode_result(result)
    assert isinstance(audio, Audio) and audio.rms() > 0.01
    bad = handle({"v": 1, "task": "speech", "input": {"text": "  "}})
    assert bad["ok"] is False and bad["error"]["type"] == "InvalidRequest" and bad["error"]["field"] == "text"
    chunks = list(handle_stream(wire.encode_request(build(SpeechRequest, text="One. Two. Three."))))
    assert [c["chunk"]["final"] for c in chunks] == [False] * (len(chunks) - 1) + [True]


def test_manager_drop_in_returns_tensor_and_report() -> None:
    torch = pytest.importorskip("torch")
    manager = CloudGPUManager(["local"])
    audio = manager.generate_speech("Hello there.", speaker=0, context=[], max_length_ms=10_000)
    assert isinstance(audio, torch.Tensor) and audio.ndim == 1 and audio.dtype == torch.float32
    assert manager.last_report is not None and manager.last_report.provider == "local"
    assert manager.last_report.attempts[0].outcome == "succeeded"


def test_load_generator_is_csm_shaped() -> None:
    """Used exactly as CSM's README uses load_csm_1b()."""
    torch = pytest.importorskip("torch")
    from broker import Segment, load_generator

    generator = load_generator(device="cpu", providers=["local"])
    assert generator.sample_rate == 24_000
    first = generator.generate(text="Hey, how are you doing.", speaker=0, context=[], max_audio_length_ms=10_000)
    segments = [Segment(text="Hey, how are you doing.", speaker=0, audio=first)]
    audio = generator.generate(text="Pretty well, thanks.", speaker=0, context=segments,
                               max_audio_length_ms=10_000)
    assert isinstance(audio, torch.Tensor) and audio.ndim == 1
    assert float(audio.abs().max()) > 0.05
    assert np.isfinite(audio.numpy()).all()
