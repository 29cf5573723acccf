"""Request validation and the v1 wire payload round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest

from broker import wire
from broker.errors import BadOutput, InvalidRequest, JobFailed, RateLimited, error_from_dict
from broker.media import SAMPLE_RATE, Audio, PhonemeTiming
from broker.types import Limits, RenderRequest, Segment, SpeechRequest, build


def tone(seconds: float = 0.5, rate: int = SAMPLE_RATE) -> Audio:
    t = np.arange(int(seconds * rate)) / rate
    return Audio(0.3 * np.sin(2 * math.pi * 220 * t), rate)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"text": ""}, "text"),
        ({"text": "   \n\t"}, "text"),
        ({"text": "hi", "max_length_ms": 0}, "max_length_ms"),
        ({"text": "hi", "max_length_ms": -5}, "max_length_ms"),
        ({"text": "hi", "max_length_ms": float("nan")}, "max_length_ms"),
        ({"text": "hi", "speaker": -1}, "speaker"),
        ({"text": "hi", "bogus": 1}, "bogus"),
    ],
)
def test_bad_speech_requests_name_the_field(fields: dict, field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        build(SpeechRequest, **fields)
    assert info.value.field == field


def test_limits_are_enforced() -> None:
    req = build(SpeechRequest, text="word " * 50)
    with pytest.raises(InvalidRequest, match="text"):
        req.check_limits(Limits(max_text_chars=100))
    req = build(SpeechRequest, text="hi", max_length_ms=1e12)
    with pytest.raises(InvalidRequest) as info:
        req.check_limits()
    assert info.value.field == "max_length_ms"


def test_segment_validation() -> None:
    with pytest.raises(InvalidRequest, match="empty"):
        Segment(speaker=0, text="x", audio=np.zeros(0, dtype=np.float32))
    with pytest.raises(InvalidRequest, match="NaN"):
        Segment(speaker=0, text="x", audio=np.array([0.1, float("nan")], dtype=np.float32))
    with pytest.raises(InvalidRequest, match="24000 Hz"):
        Segment(speaker=0, text="x", audio=tone(rate=16_000))
    seg = Segment(speaker=1, text="x", audio=tone().samples)
    assert seg.sample_rate == SAMPLE_RATE and len(seg.audio) == SAMPLE_RATE // 2


def test_render_request_validation() -> None:
    with pytest.raises(InvalidRequest, match="exactly one"):
        build(RenderRequest)
    with pytest.raises(InvalidRequest, match="exactly one"):
        build(RenderRequest, text="hi", audio=tone())
    with pytest.raises(InvalidRequest) as info:
        build(RenderRequest, text="hi", avatar=b"not an image at all")
    assert info.value.field == "avatar"
    with pytest.raises(InvalidRequest) as info:
        build(RenderRequest, text="hi", size=511)
    assert info.value.field == "size"
    with pytest.raises(InvalidRequest):
        build(RenderRequest, audio=Audio(np.array([np.inf, 0.0])))


def test_speech_payload_round_trip_keeps_context_audio() -> None:
    ctx = [Segment(speaker=1, text="earlier", audio=tone())]
    req = build(SpeechRequest, text="Hello.", speaker=1, context=ctx, max_length_ms=5000)
    payload = wire.encode_request(req, job_id="j1")
    assert payload["v"] == 1 and payload["task"] == "speech" and payload["id"] == "j1"
    back = wire.decode_request(payload)
    assert isinstance(back, SpeechRequest)
    assert back.text == "Hello." and back.speaker == 1 and back.max_length_ms == 5000
    # FLAC at 16 bits: lossless up to quantisation
    np.testing.assert_allclose(back.context[0].audio.samples, ctx[0].audio.samples, atol=1e-4)


def test_render_payload_round_trip() -> None:
    png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\1\0\0\0\1\0" + b"\0" * 20
    req = build(RenderRequest, audio=tone(1.0), avatar=png, mouth_box=(1, 2, 30, 20), fps=30, size=256)
    back = wire.decode_request(wire.encode_request(req))
    assert isinstance(back, RenderRequest)
    assert back.avatar == png and back.mouth_box == (1, 2, 30, 20) and back.fps == 30 and back.size == 256
    assert back.audio is not None and abs(back.audio.duration_s - 1.0) < 1e-3


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ([], "payload"),
        ({"v": 2, "task": "speech", "input": {}}, "v"),
        ({"v": 1, "task": "dance", "input": {}}, "task"),
        ({"v": 1, "task": "speech", "input": {}}, "input.text"),
        ({"v": 1, "task": "speech", "input": {"text": "hi", "context": [{"audio": {"b64": "@@"}}]}},
         "input.context.0.audio"),
        ({"v": 1, "task": "render", "input": {"audio": {"url": "file:///etc/passwd"}}}, "input.audio"),
    ],
)
def test_bad_payloads_are_typed(payload: object, field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        wire.decode_request(payload)
    assert info.value.field == field


def test_results_and_errors_decode_to_typed_values() -> None:
    audio = tone(0.25)
    audio.phonemes = [PhonemeTiming("a", 0.0, 0.1)]
    result = wire.decode_result(wire.encode_speech_result("j", audio), provider="p")
    assert isinstance(result, Audio) and result.phonemes and result.phonemes[0].phoneme == "a"
    err = wire.encode_error("j", InvalidRequest("text", "is empty"))
    with pytest.raises(InvalidRequest) as info:
        wire.decode_result(err)
    assert info.value.field == "text"
    with pytest.raises(JobFailed, match="ZeroDivisionError"):
        wire.decode_result(wire.encode_error("j", ZeroDivisionError("boom")))
    with pytest.raises(BadOutput):
        wire.decode_result({"ok": True, "task": "speech", "audio": {"b64": "AAAA"}})
    rl = error_from_dict({"type": "RateLimited", "message": "slow down", "retryable": True})
    assert isinstance(rl, RateLimited) and rl.retryable


def test_audio_wav_round_trip_and_tensor() -> None:
    audio = tone(0.2)
    back = Audio.from_bytes(audio.to_wav_bytes())
    assert back.sample_rate == SAMPLE_RATE and len(back) == len(audio)
    with pytest.raises(ValueError, match="not a readable audio"):
        Audio.from_bytes(b"garbage")
