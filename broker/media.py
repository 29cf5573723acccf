"""Audio and video values that every engine returns and every provider hands back.

Plain classes over numpy / bytes (not pydantic models) so large arrays are never
copied by validation. Torch is only touched when the caller asks for a tensor.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from broker.types import JobReport

#: Every engine returns mono float32 at this rate (Sesame CSM's rate), so outputs are interchangeable.
SAMPLE_RATE = 24_000


@dataclass(frozen=True)
class PhonemeTiming:
    """One phoneme and where it sits in the audio; drives the mouth in renders."""

    phoneme: str
    start_s: float
    end_s: float


def to_numpy_audio(data: Any) -> np.ndarray:
    """Accept numpy arrays, lists and torch tensors (without importing torch)."""
    if hasattr(data, "detach") and hasattr(data, "cpu"):
        data = data.detach().cpu().float().numpy()
    arr = np.asarray(data, dtype=np.float32)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    return arr


class Audio:
    """Mono float audio in [-1, 1].

    ``report`` is set by the manager: which provider made it, what it cost. ``text`` is the words it
    speaks when the engine knows them (each streamed piece carries its own; "" = no words, e.g. a tail).
    """

    __slots__ = ("_samples", "phonemes", "report", "sample_rate", "text")

    def __init__(
        self,
        samples: Any,
        sample_rate: int = SAMPLE_RATE,
        *,
        phonemes: Sequence[PhonemeTiming] | None = None,
        text: str | None = None,
    ) -> None:
        arr = to_numpy_audio(samples)
        if arr.ndim != 1:
            raise ValueError(f"audio must be 1-D (mono), got shape {arr.shape}")
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        self._samples = arr
        self.sample_rate = int(sample_rate)
        self.phonemes: list[PhonemeTiming] | None = list(phonemes) if phonemes is not None else None
        self.report: JobReport | None = None
        self.text = text

    # -- views --------------------------------------------------------------
    @property
    def samples(self) -> np.ndarray:
        return self._samples

    @property
    def duration_s(self) -> float:
        return len(self._samples) / self.sample_rate

    def __len__(self) -> int:
        return len(self._samples)

    def __repr__(self) -> str:
        return f"Audio({self.duration_s:.2f}s @ {self.sample_rate} Hz)"

    def numpy(self) -> np.ndarray:
        return self._samples

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self._samples if dtype is None else self._samples.astype(dtype)

    def to_torch(self) -> Any:
        import torch

        return torch.from_numpy(np.ascontiguousarray(self._samples))

    def peak(self) -> float:
        return float(np.max(np.abs(self._samples))) if len(self._samples) else 0.0

    def rms(self) -> float:
        return float(np.sqrt(np.mean(np.square(self._samples)))) if len(self._samples) else 0.0

    def is_finite(self) -> bool:
        return bool(np.all(np.isfinite(self._samples)))

    # -- encoding -----------------------------------------------------------
    def to_bytes(self, fmt: str = "wav") -> bytes:
        """Encode as WAV (16-bit PCM) or FLAC; both are lossless at 16 bits."""
        import soundfile as sf

        fmt = fmt.lower()
        if fmt not in ("wav", "flac"):
            raise ValueError(f"unsupported audio format {fmt!r}")
        buf = io.BytesIO()
        sf.write(buf, self._in_range(), self.sample_rate, format=fmt.upper(), subtype="PCM_16")
        return buf.getvalue()

    def to_wav_bytes(self) -> bytes:
        return self.to_bytes("wav")

    def save(self, path: str | Path) -> Path:
        """Write WAV or FLAC (by suffix) straight to ``path``: no encoded copy is held in memory."""
        import soundfile as sf

        path = Path(path)
        fmt = "flac" if path.suffix.lower() == ".flac" else "wav"
        sf.write(path, self._in_range(), self.sample_rate, format=fmt.upper(), subtype="PCM_16")
        return path

    def _in_range(self) -> np.ndarray:
        """The samples clipped to [-1, 1] (libsndfile would wrap what lies outside); a copy only if needed."""
        s = self._samples
        if len(s) and (s.max() > 1.0 or s.min() < -1.0):  # two reductions, no temporary array
            return np.clip(s, -1.0, 1.0)
        return s

    @classmethod
    def from_bytes(cls, data: bytes) -> Audio:
        """Decode WAV/FLAC/OGG bytes; multi-channel audio is averaged to mono."""
        import soundfile as sf

        try:
            samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except Exception as exc:  # soundfile raises its own LibsndfileError and RuntimeError
            raise ValueError(f"not a readable audio file ({exc})") from None
        return cls(samples.mean(axis=1), rate)

    @classmethod
    def from_file(cls, path: str | Path) -> Audio:
        return cls.from_bytes(Path(path).read_bytes())

    def resampled(self, rate: int) -> Audio:
        if rate == self.sample_rate:
            return self
        out = resample(self._samples, self.sample_rate, rate)
        scale = self.sample_rate / rate
        return Audio(out, rate, phonemes=self.phonemes if scale else None, text=self.text)

    @classmethod
    def concat(cls, parts: Sequence[Audio]) -> Audio:
        if not parts:
            raise ValueError("nothing to concatenate")
        rate = parts[0].sample_rate
        phonemes: list[PhonemeTiming] = []
        offset = 0.0
        has_phonemes = all(p.phonemes is not None for p in parts)
        for p in parts:
            if p.sample_rate != rate:
                raise ValueError("cannot concatenate audio of different sample rates")
            if has_phonemes and p.phonemes is not None:
                phonemes.extend(
                    PhonemeTiming(t.phoneme, t.start_s + offset, t.end_s + offset) for t in p.phonemes
                )
            offset += p.duration_s
        texts = [p.text for p in parts]
        text = " ".join(t for t in texts if t) if all(t is not None for t in texts) else None
        return cls(
            np.concatenate([p.samples for p in parts]), rate, phonemes=phonemes if has_phonemes else None,
            text=text,
        )


def resample(samples: np.ndarray, src: float, dst: float) -> np.ndarray:
    """High-quality resampling with soxr when installed, else band-limited FFT resampling."""
    if src == dst:
        return samples.astype(np.float32, copy=False)
    try:
        import soxr

        return soxr.resample(samples, src, dst, quality="HQ").astype(np.float32)
    except ImportError:
        n_out = round(len(samples) * dst / src)
        spectrum = np.fft.rfft(samples)
        keep = min(len(spectrum), n_out // 2 + 1)
        out = np.fft.irfft(spectrum[:keep], n_out) * (n_out / max(len(samples), 1))
        return out.astype(np.float32)


@dataclass
class AudioChunk:
    """One piece of a streamed synthesis; ``index`` counts from 0, ``final`` marks the end of the stream.

    A stream ends with a ``final`` chunk. From the manager, the local provider and a broker worker
    (what every built-in adapter reads) it is an empty end-of-stream marker (``is_end``) sent after the
    last piece, so no piece waits for the next one to be known last; a custom handler may put ``final``
    on its last piece instead. Consumers that play or join the audio need not care: the marker holds no
    samples.
    """

    audio: Audio
    index: int
    final: bool = False
    text: str | None = None

    @classmethod
    def end(cls, index: int, sample_rate: int = SAMPLE_RATE) -> AudioChunk:
        """The end-of-stream marker: no samples, no words (``text=""``), ``final``, one past the last index."""
        return cls(Audio(np.zeros(0, dtype=np.float32), sample_rate, text=""), index, final=True, text="")

    @property
    def is_end(self) -> bool:
        """Is this the empty end-of-stream marker (as opposed to a piece of audio)?"""
        return self.final and len(self.audio) == 0


@dataclass
class Video:
    """An encoded MP4 (H.264 + AAC) and what it holds."""

    data: bytes
    fps: float
    frames: int
    width: int
    height: int
    audio_seconds: float
    mime: str = "video/mp4"
    report: JobReport | None = field(default=None, repr=False)

    @property
    def duration_s(self) -> float:
        return self.frames / self.fps if self.fps else 0.0

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.data)
        return path

    def __repr__(self) -> str:
        return (
            f"Video({self.width}x{self.height}, {self.frames} frames @ {self.fps:g} fps, "
            f"{len(self.data) / 1e6:.2f} MB)"
        )


def frames_for(audio_seconds: float, fps: float) -> int:
    """The one rule for how many frames a render of this audio has (renderer and validators agree)."""
    return max(1, math.ceil(audio_seconds * fps - 1e-6))
