"""How open the mouth is in each video frame, from phoneme timings or from loudness.

Piper gives espeak IPA phonemes with durations; each maps to a viseme openness
(open vowels wide, lips closed for m/b/p, nearly closed for f/v). Without
phonemes (audio supplied by the caller) the loudness envelope stands in. Both
are smoothed so the mouth glides between shapes rather than snapping.
Output is float32 in [0, 1], one value per frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from broker.media import Audio, PhonemeTiming

#: openness per phoneme (espeak IPA as Piper emits it, one code point each)
_VISEME: dict[str, float] = {}
for _chars, _value in (
    ("aæɑɒ", 1.0),  # open vowels
    ("ʌɔɐ", 0.85),
    ("ɛeəɜɚœø", 0.65),  # mid vowels
    ("oɵ", 0.6),
    ("ɪiyʏɨ", 0.4),  # close vowels: spread lips, small opening
    ("uʊɯ", 0.3),  # rounded close vowels
    ("h", 0.45),
    ("kgŋxɡq", 0.35),  # velars: jaw fairly open
    ("ɹrlɾɫ", 0.3),
    ("jç", 0.3),
    ("tdnsz", 0.2),  # alveolars: teeth nearly together
    ("ʃʒ", 0.25),
    ("θð", 0.25),
    ("w", 0.15),
    ("fv", 0.08),  # lower lip to teeth
    ("mbp", 0.0),  # lips closed
):
    for _c in _chars:
        _VISEME[_c] = _value
#: pauses and punctuation close the mouth; Piper's ^ and $ mark a sentence's start and end
_CLOSED = set("^$_.,;:!?¡¿—–-…\"'()")
#: length and stress marks carry no shape of their own: they extend the phoneme beside them
_HOLD_PREVIOUS = set("ːˑ")
_HOLD_NEXT = set("ˈˌ")
#: unknown symbols get a middling opening rather than none
_DEFAULT = 0.35

#: the lips move slightly before the sound they make
_LEAD_S = 0.02
#: Gaussian smoothing of the viseme track (coarticulation)
_SMOOTH_S = 0.035
#: internal time resolution of the viseme track
_STEP_S = 0.005
#: loudness alone overstates openness (speech is loud most of the time): compress its top end
_LOUD_GAIN, _LOUD_POWER = 0.85, 1.5


def openness(audio: Audio, fps: float, frames: int) -> np.ndarray:
    """Per-frame mouth openness: visemes gated by loudness when phonemes exist, else loudness alone."""
    loud = loudness(audio.samples, audio.sample_rate, fps, frames)
    if audio.phonemes:
        shape = from_phonemes(audio.phonemes, fps, frames)
        # Loudness gates the visemes so a mistimed phoneme cannot open the mouth during silence.
        gate = np.clip(loud / 0.25, 0.0, 1.0)
        return np.clip(shape * gate, 0.0, 1.0).astype(np.float32)
    return (_LOUD_GAIN * loud**_LOUD_POWER).astype(np.float32)


def viseme(phoneme: str) -> float | None:
    """Openness of one phoneme; None for marks that take their neighbour's shape."""
    if phoneme in _HOLD_PREVIOUS or phoneme in _HOLD_NEXT or phoneme == " ":
        return None
    if phoneme in _CLOSED:
        return 0.0
    return _VISEME.get(phoneme, _DEFAULT)


def from_phonemes(phonemes: Sequence[PhonemeTiming], fps: float, frames: int) -> np.ndarray:
    """Viseme openness sampled at frame centres after smoothing."""
    values = _resolve_holds(phonemes)
    end_s = max(frames / fps, max((p.end_s for p in phonemes), default=0.0)) + 4 * _SMOOTH_S
    n = int(np.ceil(end_s / _STEP_S)) + 1
    track = np.zeros(n, dtype=np.float32)
    for p, v in zip(phonemes, values, strict=True):
        a = round((p.start_s - _LEAD_S) / _STEP_S)
        b = round((p.end_s - _LEAD_S) / _STEP_S)
        a, b = max(a, 0), min(max(b, a + 1), n)
        if a < n:
            track[a:b] = v
    track = _gaussian(track, _SMOOTH_S / _STEP_S)
    centres = (np.arange(frames) + 0.5) / fps
    return np.interp(centres, np.arange(n) * _STEP_S, track).astype(np.float32)


def _resolve_holds(phonemes: Sequence[PhonemeTiming]) -> list[float]:
    raw = [viseme(p.phoneme) for p in phonemes]
    out = list(raw)
    # stress marks take the next real shape; length marks and word gaps the previous one
    nxt: float | None = None
    for i in range(len(raw) - 1, -1, -1):
        if raw[i] is not None:
            nxt = raw[i]
        elif phonemes[i].phoneme in _HOLD_NEXT:
            out[i] = nxt
    prev = 0.0
    for i, v in enumerate(out):
        if v is None:
            # a space between words inside a phrase: the mouth relaxes a little, it does not shut
            out[i] = prev * 0.6 if phonemes[i].phoneme == " " else prev
        else:
            prev = v
    return [float(v) for v in out]  # type: ignore[arg-type]


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0.5:
        return x
    radius = int(3 * sigma)
    t = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (t / sigma) ** 2)
    kernel /= kernel.sum()
    return np.convolve(np.pad(x, radius, mode="edge"), kernel, mode="valid").astype(np.float32)


def loudness(samples: np.ndarray, rate: int, fps: float, frames: int) -> np.ndarray:
    """Normalised loudness per frame in [0, 1], with a noise gate so silence reads as a closed mouth."""
    x = np.asarray(samples, dtype=np.float64)
    csum = np.concatenate([[0.0], np.cumsum(x * x)])
    # windows two frames long, centred on each frame's middle: overlap keeps the envelope smooth
    centres = (np.arange(frames) + 0.5) / fps * rate
    half = rate / fps
    lo = np.clip(np.round(centres - half), 0, len(x)).astype(np.int64)
    hi = np.clip(np.round(centres + half), 0, len(x)).astype(np.int64)
    count = np.maximum(hi - lo, 1)
    rms = np.sqrt((csum[hi] - csum[lo]) / count)
    db = 20 * np.log10(rms + 1e-9)
    loud = float(np.percentile(db, 95)) if frames else -200.0
    if loud < -50.0:  # the whole clip is silence
        return np.zeros(frames, dtype=np.float32)
    # gate: 35 dB under the loud parts is silence; map the span between linearly
    floor = max(loud - 35.0, -60.0)
    env = np.clip((db - floor) / (loud - floor), 0.0, 1.0)
    env = np.clip((env - 0.15) / 0.85, 0.0, 1.0)  # the bottom of the range is breath and room noise
    # fast attack, slower release: jaws open quickly and close a little more lazily
    out = np.empty_like(env)
    level = 0.0
    for i, target in enumerate(env):
        level += (0.7 if target > level else 0.45) * (target - level)
        out[i] = level
    return out.astype(np.float32)
