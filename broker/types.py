"""Request and result models.

Requests validate on construction: bad input raises ``InvalidRequest`` naming the
field before any engine or provider is involved. ``Audio``/``Video`` live in
``broker.media`` (numpy-backed, not pydantic) and are re-exported here.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from broker.errors import InvalidRequest
from broker.image_header import image_format, image_size
from broker.media import SAMPLE_RATE, Audio, AudioChunk, PhonemeTiming, Video, to_numpy_audio

__all__ = [
    "SAMPLE_RATE",
    "Attempt",
    "Audio",
    "AudioChunk",
    "JobReport",
    "Limits",
    "PhonemeTiming",
    "Quote",
    "RenderRequest",
    "Segment",
    "SpeechRequest",
    "Task",
    "Video",
    "build",
]

Task = Literal["speech", "render"]

#: the shortest length a request may ask for: one sample at the output rate
MIN_LENGTH_MS = 1000.0 / SAMPLE_RATE
#: frame rates a render may ask for (below 1 fps a frame outlasts any word; above 60 nothing gains)
MIN_FPS, MAX_FPS = 1.0, 60.0


class Limits(BaseModel):
    """Bounds on a request. Defaults suit an audiobook chapter; settings can tighten them."""

    model_config = ConfigDict(frozen=True)

    max_text_chars: int = 100_000
    #: four hours: longer than any single job we want to hold on one worker
    max_length_ms: float = 4 * 3600 * 1000
    max_context_segments: int = 16
    max_avatar_bytes: int = 20 * 1024 * 1024
    max_render_seconds: float = 600.0
    #: frames in one render (seconds x fps): bounds the worker's time and memory per job
    max_render_frames: int = 36_000
    #: pixels of a decoded avatar (read from the image header before decoding): 25 MP is 75 MB as RGB
    max_image_pixels: int = 25_000_000


DEFAULT_LIMITS = Limits()


class Segment(BaseModel):
    """A turn of conversation given as context (Sesame CSM's ``Segment``): who spoke, what, how it sounded."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    speaker: int
    text: str
    audio: Audio
    sample_rate: int = SAMPLE_RATE

    def __init__(self, speaker: int, text: str, audio: Any, sample_rate: int | None = None, **kw: Any):
        # CSM builds Segment(speaker=, text=, audio=tensor); keep that call shape working.
        try:
            super().__init__(speaker=speaker, text=text, audio=audio, sample_rate=sample_rate, **kw)
        except ValidationError as exc:
            raise invalid_from_validation(exc, prefix="segment") from None

    @model_validator(mode="before")
    @classmethod
    def _coerce_audio(cls, data: Any) -> Any:
        if isinstance(data, dict):
            audio = data.get("audio")
            rate = data.get("sample_rate")
            if isinstance(audio, Audio):
                data["sample_rate"] = rate or audio.sample_rate
            elif audio is not None:
                arr = to_numpy_audio(audio)
                if arr.ndim != 1:
                    raise ValueError(f"audio must be 1-D, got shape {arr.shape}")
                data["audio"] = Audio(arr, rate or SAMPLE_RATE)
                data["sample_rate"] = rate or SAMPLE_RATE
            elif rate is None:
                data["sample_rate"] = SAMPLE_RATE
        return data

    @field_validator("text")
    @classmethod
    def _segment_text(cls, v: str) -> str:
        return check_string(v)

    @model_validator(mode="after")
    def _check_audio(self) -> Segment:
        if len(self.audio) == 0:
            raise ValueError("audio is empty")
        if not self.audio.is_finite():
            raise ValueError("audio contains NaN or infinite samples")
        if self.audio.sample_rate != SAMPLE_RATE:
            raise ValueError(
                f"audio is at {self.audio.sample_rate} Hz; context audio must be {SAMPLE_RATE} Hz "
                f"(resample with Audio(x, rate).resampled({SAMPLE_RATE}))"
            )
        return self


#: lone surrogates (how Python carries bytes that were not UTF-8) and control characters but tab/CR/LF
_UNCARRIABLE = re.compile("[\ud800-\udfff\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
#: a letter or a digit in any script (\w without the underscore)
_SPEAKABLE = re.compile(r"[^\W_]")


def check_string(value: str) -> str:
    """Reject what no engine or wire can carry: lone surrogates (input that was not UTF-8) and control bytes."""
    bad = _UNCARRIABLE.search(value)
    if bad is not None:
        code = ord(bad.group())
        if 0xD800 <= code <= 0xDFFF:
            raise ValueError(f"is not valid UTF-8 (an undecodable byte or lone surrogate at character {bad.start()})")
        raise ValueError(f"contains the control character U+{code:04X} at character {bad.start()}")
    return value


def _speakable(value: str) -> bool:
    """At least one letter or digit: punctuation and symbols alone make no sound."""
    return _SPEAKABLE.search(value) is not None


def _clean_text(value: str | None) -> str | None:
    if value is None:
        return None
    stripped = check_string(value).strip()
    if not stripped:
        raise ValueError("text is empty or only whitespace")
    if not _speakable(stripped):
        raise ValueError("has nothing to speak (no letters or digits)")
    return stripped


def _check_name(value: int | str) -> int | str:
    if isinstance(value, str):
        check_string(value)
    return value


class SpeechRequest(BaseModel):
    """Speak ``text`` as ``speaker``, optionally conditioned on earlier ``context`` turns."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    text: str
    speaker: int | str = 0
    context: list[Segment] = Field(default_factory=list)
    #: None = the engine's own cap (CSM: 90 s; Piper: none)
    max_length_ms: float | None = None
    #: None = the configured default engine
    engine: str | None = None
    temperature: float = Field(default=0.9, ge=0.0, le=2.0)
    topk: int = Field(default=50, ge=1, le=10_000)

    @field_validator("text")
    @classmethod
    def _text(cls, v: str) -> str:
        cleaned = _clean_text(v)
        assert cleaned is not None
        return cleaned

    @field_validator("max_length_ms")
    @classmethod
    def _max_len(cls, v: float | None) -> float | None:
        if v is None:
            return v
        if not math.isfinite(v) or v <= 0:
            raise ValueError("must be a positive number of milliseconds")
        if v < MIN_LENGTH_MS:
            raise ValueError(f"{v:g} ms is shorter than one sample ({MIN_LENGTH_MS:.4f} ms at {SAMPLE_RATE} Hz)")
        return v

    @field_validator("speaker")
    @classmethod
    def _speaker(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError("speaker ids are >= 0")
        return _check_name(v)

    @field_validator("engine")
    @classmethod
    def _engine(cls, v: str | None) -> str | None:
        return None if v is None else check_string(v)

    def check_limits(self, limits: Limits = DEFAULT_LIMITS) -> SpeechRequest:
        if len(self.text) > limits.max_text_chars:
            raise InvalidRequest(
                "text", f"{len(self.text)} characters is over the limit of {limits.max_text_chars}"
            )
        if self.max_length_ms is not None and self.max_length_ms > limits.max_length_ms:
            raise InvalidRequest(
                "max_length_ms", f"{self.max_length_ms:g} ms is over the limit of {limits.max_length_ms:g} ms"
            )
        if len(self.context) > limits.max_context_segments:
            raise InvalidRequest(
                "context", f"{len(self.context)} segments is over the limit of {limits.max_context_segments}"
            )
        return self

    @property
    def task(self) -> Task:
        return "speech"

    def words(self) -> int:
        return len(self.text.split())


class RenderRequest(BaseModel):
    """A talking-head video of ``avatar`` speaking ``audio`` (or ``text``, synthesised first)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    audio: Audio | None = None
    text: str | None = None
    speaker: int | str = 0
    engine: str | None = None
    #: encoded image bytes (PNG/JPEG/WebP/BMP); None = preset or the packaged default avatar
    avatar: bytes | None = None
    #: a named avatar pre-processed by the worker (self-hosted worker's preset directory)
    avatar_preset: str | None = None
    #: mouth box (x, y, w, h) in avatar pixels when the caller knows it; else it is detected
    mouth_box: tuple[int, int, int, int] | None = None
    fps: float = Field(default=25.0, ge=MIN_FPS, le=MAX_FPS)
    size: int = Field(default=512, ge=64, le=2048)

    @field_validator("text")
    @classmethod
    def _text(cls, v: str | None) -> str | None:
        return _clean_text(v)

    @field_validator("speaker", "engine", "avatar_preset")
    @classmethod
    def _names(cls, v: int | str | None) -> int | str | None:
        return None if v is None else _check_name(v)

    @field_validator("audio")
    @classmethod
    def _audio(cls, v: Audio | None) -> Audio | None:
        if v is None:
            return v
        if len(v) == 0:
            raise ValueError("audio is empty")
        if not v.is_finite():
            raise ValueError("audio contains NaN or infinite samples")
        return v

    @field_validator("avatar")
    @classmethod
    def _avatar(cls, v: bytes | None) -> bytes | None:
        if v is None:
            return v
        if image_format(v) is None:
            raise ValueError("is not a PNG, JPEG, WebP, GIF or BMP image")
        return v  # its pixel count is checked by check_limits, and again before the engine decodes it

    @field_validator("mouth_box")
    @classmethod
    def _box(cls, v: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
        if v is not None and (v[2] <= 0 or v[3] <= 0 or v[0] < 0 or v[1] < 0):
            raise ValueError("must be (x, y, w, h) with x, y >= 0 and w, h > 0")
        return v

    @field_validator("size")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError("must be even (H.264 needs even dimensions)")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> RenderRequest:
        if (self.audio is None) == (self.text is None):
            raise ValueError("give exactly one of audio or text")
        return self

    def check_limits(self, limits: Limits = DEFAULT_LIMITS) -> RenderRequest:
        if self.text is not None and len(self.text) > limits.max_text_chars:
            raise InvalidRequest("text", f"over the limit of {limits.max_text_chars} characters")
        if self.audio is not None and self.audio.duration_s > limits.max_render_seconds:
            raise InvalidRequest(
                "audio", f"{self.audio.duration_s:.1f} s is over the limit of {limits.max_render_seconds:g} s"
            )
        if self.avatar is not None and len(self.avatar) > limits.max_avatar_bytes:
            raise InvalidRequest("avatar", f"over the limit of {limits.max_avatar_bytes} bytes")
        if self.avatar is not None:
            w, h = image_size(self.avatar) or (0, 0)
            if w * h > limits.max_image_pixels:
                raise InvalidRequest(
                    "avatar", f"is {w}x{h} pixels, over the limit of {limits.max_image_pixels:,} pixels"
                )
        frames = math.ceil(self.audio_seconds_hint() * self.fps)
        if frames > limits.max_render_frames:
            raise InvalidRequest(
                "fps", f"{self.audio_seconds_hint():.1f} s at {self.fps:g} fps is {frames:,} frames, "
                f"over the limit of {limits.max_render_frames:,}"
            )
        return self

    @property
    def task(self) -> Task:
        return "render"

    def audio_seconds_hint(self) -> float:
        """Audio length if known, else an estimate from the text (about 2.5 words a second)."""
        if self.audio is not None:
            return self.audio.duration_s
        return estimate_speech_seconds(self.text or "")


def estimate_speech_seconds(text: str) -> float:
    """~150 words a minute, the pace of audiobook narration; used for quotes and sanity checks."""
    return max(0.5, len(text.split()) / 2.5)


AnyRequest = SpeechRequest | RenderRequest


def build(model: type[BaseModel], **fields: Any) -> Any:
    """Construct a request, turning pydantic's error into ``InvalidRequest`` naming the first bad field."""
    try:
        return model(**fields)
    except ValidationError as exc:
        raise invalid_from_validation(exc) from None


_TYPE_TAGS = {"int", "str", "float", "bool", "bytes", "none", "list", "dict", "tuple", "is-instance"}


def _is_type_tag(part: object) -> bool:
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part)


def invalid_from_validation(exc: ValidationError, prefix: str = "") -> InvalidRequest:
    err = exc.errors()[0]
    parts = [prefix] if prefix else []
    # union members add their type to the location ("speaker.int"); the field is what the caller named
    parts += [str(p) for p in err.get("loc", ()) if not _is_type_tag(p)]
    loc = ".".join(parts) or "input"
    msg = str(err.get("msg", "invalid"))
    msg = msg.removeprefix("Value error, ")
    return InvalidRequest(loc, msg)


Outcome = Literal["succeeded", "failed", "cancelled", "lost", "rejected", "skipped"]


class Quote(BaseModel):
    """What a provider expects a request to cost and take."""

    provider: str
    hardware: str
    expected_seconds: float
    expected_usd: float
    #: seconds split into queue / cold_start / run, for tables and deadline policies
    breakdown: dict[str, float] = Field(default_factory=dict)
    #: "measured" / "published" / "estimate": where the speed figure came from
    basis: str = "estimate"
    #: set when the provider cannot take this request (shown by `broker quote`)
    dropped: str | None = None


class Attempt(BaseModel):
    """One try at one provider, successful or not."""

    provider: str
    outcome: Outcome
    provider_job_id: str | None = None
    error_class: str | None = None
    message: str | None = None
    seconds: float = 0.0
    billed_seconds: float | None = None
    cost_usd: float = 0.0
    #: True when the cost came from our catalog rather than the provider's own bill
    cost_estimated: bool = True
    started_at: float | None = None
    ended_at: float | None = None


class JobReport(BaseModel):
    """Everything that happened to one job: where it ran, each attempt, what it cost."""

    job_id: str
    task: Task
    provider: str | None = None
    attempts: list[Attempt] = Field(default_factory=list)
    cost_usd: float = 0.0
    wall_seconds: float = 0.0
    audio_seconds: float = 0.0
    frames: int | None = None
    fps: float | None = None

    def summary(self) -> dict[str, Any]:
        out = self.model_dump()
        out["cost_usd"] = round(self.cost_usd, 8)
        return out


def audio_stats(samples: np.ndarray) -> dict[str, float]:
    """Cheap numbers used by output validation and tests."""
    if len(samples) == 0:
        return {"peak": 0.0, "rms": 0.0}
    return {"peak": float(np.max(np.abs(samples))), "rms": float(np.sqrt(np.mean(samples**2)))}
