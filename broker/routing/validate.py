"""Output validation: a provider's answer is checked before the caller ever sees it.

An HTTP 200 is not success. Audio must be finite, non-empty, not silent and of a plausible
length for its text (unless ``max_length_ms`` cut it short); a video's frame count must match
its audio (``broker.media.frames_for``) and it must look like an MP4. A bad output raises
``BadOutput``, which the manager treats as that provider's failure and fails over.
"""

from __future__ import annotations

import numpy as np

from broker.errors import BadOutput
from broker.media import Audio, Video, frames_for
from broker.types import RenderRequest, SpeechRequest, estimate_speech_seconds

#: RMS level below which audio counts as silence (about -66 dBFS; speech sits near -20)
SILENCE_RMS = 5e-4
#: shortest believable speech relative to the text-length estimate (fast voices, short words)
MIN_LENGTH_RATIO = 0.3
#: longest believable speech: a generous multiple of the estimate plus slack for pauses
MAX_LENGTH_RATIO = 3.0
MAX_LENGTH_SLACK_S = 2.0


def check_audio(audio: Audio, text: str, max_length_ms: float | None = None, *, provider: str | None = None) -> None:
    def bad(why: str) -> BadOutput:
        return BadOutput(f"audio {why}", provider=provider, retryable=False)

    samples = audio.samples
    if len(samples) == 0:
        raise bad("is empty")
    if audio.sample_rate < 8000:
        raise bad(f"has an implausible sample rate of {audio.sample_rate} Hz")
    # One BLAS pass, no temporaries: NaN and inf propagate into the energy, which also gives the RMS.
    energy = float(np.dot(samples, samples))
    if not np.isfinite(energy):
        raise bad("contains NaN or infinite samples")
    if (energy / len(samples)) ** 0.5 < SILENCE_RMS:
        raise bad("is silent")
    duration = audio.duration_s
    expected = estimate_speech_seconds(text)
    cap = max_length_ms / 1000.0 if max_length_ms is not None else None
    if cap is not None and duration > cap * 1.1 + 0.5:
        raise bad(f"is {duration:.2f} s, over the {cap:g} s max_length_ms")
    hit_cap = cap is not None and duration >= cap * 0.9
    floor = MIN_LENGTH_RATIO * (min(expected, cap) if cap is not None else expected)
    if not hit_cap and duration < floor:
        raise bad(f"is {duration:.2f} s, too short for {len(text.split())} words (truncated?)")
    if duration > MAX_LENGTH_RATIO * expected + MAX_LENGTH_SLACK_S:
        raise bad(f"is {duration:.2f} s, far too long for {len(text.split())} words")


def check_video(video: Video, request: RenderRequest, *, provider: str | None = None) -> None:
    def bad(why: str) -> BadOutput:
        return BadOutput(f"video {why}", provider=provider, retryable=False)

    if not video.data or b"ftyp" not in video.data[:16]:
        raise bad("is not an MP4 (no ftyp box)")
    if video.frames <= 0 or video.width <= 0 or video.height <= 0:
        raise bad(f"has no picture ({video.frames} frames, {video.width}x{video.height})")
    if abs(video.fps - request.fps) > 0.01:
        raise bad(f"is at {video.fps:g} fps; {request.fps:g} was asked for")
    want = frames_for(video.audio_seconds, video.fps)
    if abs(video.frames - want) > 1:
        raise bad(f"has {video.frames} frames for {video.audio_seconds:.2f} s of audio; expected {want}")
    if request.audio is not None:
        if abs(video.audio_seconds - request.audio.duration_s) > 0.05 + 1.0 / request.fps:
            raise bad(f"carries {video.audio_seconds:.2f} s of audio; the input had {request.audio.duration_s:.2f} s")
    elif request.text is not None:
        expected = estimate_speech_seconds(request.text)
        if not MIN_LENGTH_RATIO * expected <= video.audio_seconds <= MAX_LENGTH_RATIO * expected + MAX_LENGTH_SLACK_S:
            raise bad(f"carries {video.audio_seconds:.2f} s of speech, implausible for the text")


def check_output(request: SpeechRequest | RenderRequest, output: object, *, provider: str | None = None) -> None:
    """Raise ``BadOutput`` unless ``output`` is a valid answer to ``request``."""
    if isinstance(request, SpeechRequest):
        if not isinstance(output, Audio):
            raise BadOutput(f"expected audio, got {type(output).__name__}", provider=provider, retryable=False)
        check_audio(output, request.text, request.max_length_ms, provider=provider)
    else:
        if not isinstance(output, Video):
            raise BadOutput(f"expected a video, got {type(output).__name__}", provider=provider, retryable=False)
        check_video(output, request, provider=provider)
