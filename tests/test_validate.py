"""Output validation: an HTTP 200 is not success."""

from __future__ import annotations

import numpy as np
import pytest

from broker.errors import BadOutput
from broker.media import SAMPLE_RATE, Audio, Video
from broker.routing.validate import check_output
from broker.testing.fake import make_output
from broker.types import RenderRequest, SpeechRequest

TEXT = "twelve words of speech should last a handful of seconds when spoken aloud"


def tone(seconds: float, amp: float = 0.3) -> Audio:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return Audio((amp * np.sin(2 * np.pi * 200 * t)).astype(np.float32))


def test_plausible_speech_passes() -> None:
    check_output(SpeechRequest(text=TEXT), tone(4.0))
    check_output(SpeechRequest(text="Hi."), tone(0.4))


@pytest.mark.parametrize(
    ("audio", "why"),
    [
        (Audio(np.zeros(0, dtype=np.float32)), "empty"),
        (tone(4.0, amp=0.0), "silent"),
        (tone(4.0, amp=0.0005), "silent"),
        (Audio(np.array([0.1, np.nan, 0.2] * 40000, dtype=np.float32)), "NaN"),
        (Audio(np.array([0.1, np.inf] * 40000, dtype=np.float32)), "NaN or infinite"),
        (tone(0.3), "too short"),
        (tone(60.0), "too long"),
    ],
)
def test_bad_speech_is_bad_output(audio: Audio, why: str) -> None:
    with pytest.raises(BadOutput, match=why):
        check_output(SpeechRequest(text=TEXT), audio, provider="p")


def test_max_length_cut_is_not_truncation_but_overrun_is_bad() -> None:
    check_output(SpeechRequest(text=TEXT, max_length_ms=1000), tone(1.0))
    with pytest.raises(BadOutput, match="max_length_ms"):
        check_output(SpeechRequest(text=TEXT, max_length_ms=1000), tone(3.0))


def test_video_frames_must_match_its_audio() -> None:
    req = RenderRequest(audio=tone(2.0), fps=25)
    good = make_output(req)
    assert isinstance(good, Video)
    check_output(req, good)
    with pytest.raises(BadOutput, match="frames"):
        check_output(req, make_output(req, "truncated"))
    with pytest.raises(BadOutput, match="MP4"):
        check_output(req, Video(b"not a video", 25, good.frames, 512, 512, good.audio_seconds))
    with pytest.raises(BadOutput, match="audio"):
        check_output(req, Video(good.data, 25, 125, 512, 512, 5.0))
    with pytest.raises(BadOutput, match="expected a video"):
        check_output(req, tone(2.0))
