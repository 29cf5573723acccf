"""Joining pieces: steady loudness, no clicks at the joins, the pauses a reader would make.

Pieces end at sentence ends, so each join is a sentence (or chapter) break: the engine's own trailing
silence is kept, each edge gets a 5 ms raised-cosine fade (a cut in the middle of a waveform clicks,
a fade does not), and a short pause follows — longer after a chapter. Overlapping cross-fades would blur
the last word of one piece into the first of the next, so joins fade to silence instead. Loudness is
levelled per piece toward one speech-level target (gain limited to ±6 dB and by the peak), so a piece
made on another provider or GPU does not jump out.
"""

from __future__ import annotations

import numpy as np

FADE_S = 0.005
PIECE_PAUSE_S = 0.15
CHAPTER_PAUSE_S = 1.5
#: speech RMS target (about -20 dBFS over voiced frames)
TARGET_RMS = 0.1
_MAX_GAIN, _MIN_GAIN, _PEAK = 2.0, 0.5, 0.98
_FRAME_S = 0.02


def speech_rms(samples: np.ndarray, rate: int) -> float:
    """RMS over the frames louder than -40 dBFS (pauses do not count: they are not loudness)."""
    n = max(1, int(rate * _FRAME_S))
    frames = len(samples) // n
    if frames == 0:
        return float(np.sqrt(np.mean(np.square(samples)))) if len(samples) else 0.0
    power = np.mean(np.square(samples[: frames * n].reshape(frames, n)), axis=1)
    voiced = power[power > 1e-4]
    return float(np.sqrt(np.mean(voiced))) if len(voiced) else 0.0


def level_gain(samples: np.ndarray, rate: int) -> float:
    rms = speech_rms(samples, rate)
    if rms <= 0:
        return 1.0
    gain = min(_MAX_GAIN, max(_MIN_GAIN, TARGET_RMS / rms))
    peak = float(np.max(np.abs(samples))) if len(samples) else 0.0
    if peak * gain > _PEAK:
        gain = _PEAK / peak
    return gain


def fade_edges(samples: np.ndarray, rate: int) -> np.ndarray:
    """``samples`` (a copy) with a raised-cosine fade in and out."""
    out = np.array(samples, dtype=np.float32, copy=True)
    n = min(int(rate * FADE_S), len(out) // 2)
    if n > 0:
        ramp = (0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, n, dtype=np.float32))).astype(np.float32)
        out[:n] *= ramp
        out[-n:] *= ramp[::-1]
    return out


def prepare(samples: np.ndarray, rate: int) -> np.ndarray:
    """One piece as it goes into the book: levelled, then faded at both edges."""
    return fade_edges(samples * np.float32(level_gain(samples, rate)), rate)


def pause(rate: int, chapter_end: bool) -> np.ndarray:
    return np.zeros(int(rate * (CHAPTER_PAUSE_S if chapter_end else PIECE_PAUSE_S)), dtype=np.float32)


__all__ = ["CHAPTER_PAUSE_S", "PIECE_PAUSE_S", "fade_edges", "level_gain", "pause", "prepare", "speech_rms"]
