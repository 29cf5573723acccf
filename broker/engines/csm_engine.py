"""Sesame CSM through Hugging Face ``transformers`` (``CsmForConditionalGeneration``), from a local folder.

CSM is a Llama-style backbone that predicts the first Mimi codebook of each 80 ms
frame, a small depth decoder that fills in the other codebooks, and the Mimi codec
that turns codes into 24 kHz audio. A conversation goes in through the processor's
chat template: each context turn is ``[speaker]text`` followed by its audio (encoded
to codes by Mimi inside ``generate``), the last turn is the text to speak.

Streaming is sentence by sentence: every sentence is generated with the request's
context plus the sentences already spoken as conversation turns (the way CSM's own
README makes long audio), and yielded as soon as it is decoded. ``max_length_ms``
bounds the whole text (80 ms frames at 12.5 Hz; CSM's 90 s when unset); each piece
is also bounded by a generous speaking time for its text, because CSM sometimes
fails to end a sentence and runs on in silence or babble. When the model's position
window (2048 for csm-1b) fills up, the oldest spoken pieces are forgotten first; the caller's own
context is never dropped (a context too long to leave room is an ``InvalidRequest``).
Cancellation is checked between sentences and, through a ``generate`` streamer, after
every frame.

Weights are only ever read from the configured folder; nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from broker.engines.base import SpeechEngine, check_cancel
from broker.errors import EngineUnavailable, InvalidRequest
from broker.media import SAMPLE_RATE, Audio, resample
from broker.types import SpeechRequest

log = logging.getLogger(__name__)

#: CSM has no fixed voice list: a speaker is the integer written as "[N]" before each turn's text.
#: The model was trained on two-party conversations (Sesame's and Hugging Face's examples use 0 and 1);
#: higher ids are just other labels. We expose 0..9 so typos like 42 are caught.
DEFAULT_NUM_SPEAKERS = 10
#: CSM's own generator caps one call at 90 s of audio when no length is given.
DEFAULT_MAX_LENGTH_MS = 90_000.0

_SENTENCE = re.compile(r"(?<=[.!?…])\s+|\s*\n+\s*")
_CLAUSE = re.compile(r"(?<=[,;:—])\s+")
# Long sentences are split at clauses (then words): one call per piece keeps the prompt inside the window.
_MAX_PIECE_CHARS = 300
# Most audio one piece may take: a generous speaking time (slow speech is ~10 characters a second) plus
# room for pauses.
_SECONDS_PER_CHAR = 0.12
_SECONDS_PER_PIECE = 1.5


@dataclass
class _Turn:
    """One conversation turn as the processor wants it; ``audio`` at the codec's rate, None for the turn to speak."""

    speaker: int
    text: str
    audio: np.ndarray | None = None


class CSMEngine(SpeechEngine):
    name = "csm"

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: str = "cpu",
        *,
        dtype: str | None = None,
        num_speakers: int = DEFAULT_NUM_SPEAKERS,
    ) -> None:
        """``dtype``: None picks bfloat16 on CUDA and float32 on the CPU; "float16"/"float32" suit GPUs without bf16."""
        self._path = Path(path).expanduser()
        self._device = device
        self._dtype_name = dtype
        self._num_speakers = num_speakers
        self._model: Any = None
        self._processor: Any = None
        self._load_lock = threading.Lock()
        # One generate at a time: the depth decoder's generation config is set per call.
        self._generate_lock = threading.Lock()
        self.codec_rate = SAMPLE_RATE
        self.frame_rate = 12.5
        self.window = 2048

    @property
    def device(self) -> str:
        return self._device

    @property
    def samples_per_frame(self) -> int:
        return round(self.codec_rate / self.frame_rate)

    # -- loading -------------------------------------------------------------
    def load(self) -> None:
        with self._load_lock:
            if self._model is not None:
                return
            check_weights_folder(self._path)
            try:
                import torch
                import transformers  # noqa: F401
            except ImportError as exc:
                raise EngineUnavailable(f"the CSM engine needs torch and transformers ({exc}): "
                                        "pip install 'broker[local]'") from None
            dtype = self._torch_dtype(torch)
            started = time.perf_counter()
            with _hub_offline():
                from transformers import AutoProcessor, CsmForConditionalGeneration

                try:
                    processor = AutoProcessor.from_pretrained(str(self._path), local_files_only=True)
                except Exception as exc:
                    raise EngineUnavailable(f"could not load the CSM processor (tokenizer, feature extractor, "
                                            f"chat template) from {self._path}: {exc}") from None
                try:
                    model = CsmForConditionalGeneration.from_pretrained(
                        str(self._path), local_files_only=True, dtype=dtype
                    )
                    model = model.to(self._device).eval()
                except Exception as exc:
                    raise EngineUnavailable(f"could not load CSM weights from {self._path} "
                                            f"on {self._device}: {exc}") from None
            if not getattr(processor, "chat_template", None):
                raise EngineUnavailable(f"the CSM processor in {self._path} has no chat template")
            codec = model.config.codec_config
            self.codec_rate = int(getattr(codec, "sampling_rate", SAMPLE_RATE))
            self.frame_rate = float(getattr(codec, "frame_rate", 12.5))
            self.window = int(model.config.max_position_embeddings)
            self._processor, self._model = processor, model
            log.info("CSM loaded from %s on %s (%s) in %.1f s", self._path, self._device, dtype,
                     time.perf_counter() - started)

    def _torch_dtype(self, torch: Any) -> Any:
        name = self._dtype_name or ("bfloat16" if self._device.startswith("cuda") else "float32")
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise EngineUnavailable(f"unknown CSM dtype {name!r}; use bfloat16, float16 or float32")
        return dtype

    # -- requests ------------------------------------------------------------
    def speakers(self) -> list[str]:
        return [str(i) for i in range(self._num_speakers)]

    def check(self, request: SpeechRequest) -> None:
        super().check(request)
        for i, segment in enumerate(request.context):
            if not 0 <= segment.speaker < self._num_speakers:
                raise InvalidRequest(f"context[{i}].speaker",
                                     f"CSM speakers are 0..{self._num_speakers - 1}, got {segment.speaker}")
        self.load()
        budget = self._frame_budget(request.max_length_ms)
        if budget < 1:
            raise InvalidRequest("max_length_ms", f"CSM makes audio in {1000 / self.frame_rate:g} ms frames; "
                                                  f"ask for at least that much")
        # The request's own context must leave room to speak its longest piece; spoken pieces are dropped as needed.
        longest = max(_pieces(request.text), key=len)
        turns = [*self._context_turns(request), _Turn(self._speaker_id(request.speaker), longest)]
        prompt = self._prompt_length(turns)
        want = min(budget, self._frames_for(longest))
        if prompt + want > self.window:
            raise InvalidRequest(
                "context", f"the context and text take {prompt} of CSM's {self.window} positions, leaving "
                           f"{max(0, self.window - prompt)} frames where about {want} are needed to speak; "
                           "pass fewer or shorter context segments",
            )

    def stream(self, request: SpeechRequest, cancel: threading.Event | None = None) -> Iterator[Audio]:
        self.load()
        self.check(request)
        speaker = self._speaker_id(request.speaker)
        max_ms = request.max_length_ms if request.max_length_ms is not None else DEFAULT_MAX_LENGTH_MS
        frames_left = self._frame_budget(max_ms)
        samples_left = int(max_ms * SAMPLE_RATE / 1000)
        history = self._context_turns(request)
        given = len(history)
        for piece in _pieces(request.text):
            check_cancel(cancel)
            if frames_left <= 0 or samples_left <= 0:
                return
            target = _Turn(speaker, piece)
            inputs, max_frames = self._fit(history, given, target, frames_left)
            audio = self._generate(inputs, max_frames, request, cancel)
            frames_left -= math.ceil(len(audio) / self.samples_per_frame)
            if not len(audio):
                continue
            history.append(_Turn(speaker, piece, audio))
            out = resample(audio, self.codec_rate, SAMPLE_RATE)[:samples_left]
            samples_left -= len(out)
            yield Audio(out, SAMPLE_RATE, text=piece)

    # -- internals -----------------------------------------------------------
    def _speaker_id(self, speaker: int | str) -> int:
        return speaker if isinstance(speaker, int) else self.speakers().index(speaker)

    def _frame_budget(self, max_length_ms: float | None) -> int:
        ms = DEFAULT_MAX_LENGTH_MS if max_length_ms is None else max_length_ms
        return int(ms / 1000 * self.frame_rate)

    def _frames_for(self, text: str) -> int:
        return math.ceil((len(text) * _SECONDS_PER_CHAR + _SECONDS_PER_PIECE) * self.frame_rate)

    def _context_turns(self, request: SpeechRequest) -> list[_Turn]:
        return [
            _Turn(s.speaker, s.text, resample(s.audio.samples, s.audio.sample_rate, self.codec_rate))
            for s in request.context
        ]

    def _inputs(self, turns: list[_Turn]) -> Any:
        conversation = []
        for turn in turns:
            content: list[dict[str, Any]] = [{"type": "text", "text": turn.text}]
            if turn.audio is not None:
                content.append({"type": "audio", "audio": turn.audio})
            conversation.append({"role": str(turn.speaker), "content": content})
        return self._processor.apply_chat_template(conversation, tokenize=True, return_dict=True)

    def _prompt_length(self, turns: list[_Turn]) -> int:
        return int(self._inputs(turns)["input_ids"].shape[-1])

    def _fit(self, history: list[_Turn], given: int, target: _Turn, frames_left: int) -> tuple[Any, int]:
        """Prompt for ``target`` and how many frames it may take; forgets the oldest spoken pieces to make room."""
        want = min(frames_left, self._frames_for(target.text))
        while True:
            inputs = self._inputs([*history, target])
            room = self.window - int(inputs["input_ids"].shape[-1])
            if room >= want or len(history) == given:
                break
            del history[given]
        if room < 1:
            raise InvalidRequest("context", f"no room left in CSM's {self.window}-position window for {target.text!r}")
        return inputs, min(want, room)

    def _generate(self, inputs: Any, max_frames: int, request: SpeechRequest,
                  cancel: threading.Event | None) -> np.ndarray:
        model = self._model
        inputs = inputs.to(self._device)
        if "input_values" in inputs:
            inputs["input_values"] = inputs["input_values"].to(model.dtype)
        sample = request.temperature > 0
        options: dict[str, Any] = {"do_sample": sample, "depth_decoder_do_sample": sample}
        if sample:
            options.update(temperature=request.temperature, top_k=request.topk,
                           depth_decoder_temperature=request.temperature, depth_decoder_top_k=request.topk)
        streamer = _CancelStreamer(cancel) if cancel is not None else None
        with self._generate_lock:
            out = model.generate(**inputs, max_new_tokens=max_frames, streamer=streamer, **options)
            codes = getattr(out, "sequences", out)  # a checkpoint may ask for dict outputs
            return self._decode(codes[0])

    def _decode(self, frames: Any) -> np.ndarray:
        """Mimi-decode ``(frames, codebooks)`` up to the first end-of-speech frame (every codebook = EOS).

        Same cut as ``generate(output_audio=True)``, but an end at the very first frame gives empty audio
        instead of a convolution over nothing.
        """
        import torch

        ended = (frames == self._model.config.codebook_eos_token_id).all(dim=-1).nonzero()
        if ended.numel():
            frames = frames[: int(ended.min())]
        if frames.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        with torch.no_grad():
            audio = self._model.codec_model.decode(frames.transpose(0, 1).unsqueeze(0)).audio_values
        return np.ascontiguousarray(audio.detach().float().cpu().numpy().reshape(-1))


class _CancelStreamer:
    """``generate`` hands every new frame to its streamer; raising here stops generation mid-sentence."""

    def __init__(self, cancel: threading.Event | None) -> None:
        self.cancel = cancel

    def put(self, value: Any) -> None:
        check_cancel(self.cancel)

    def end(self) -> None:
        pass


def check_weights_folder(path: Path) -> None:
    hint = "set engines.csm_path (BROKER_ENGINES__CSM_PATH) to a local CsmForConditionalGeneration folder"
    if not path.is_dir():
        raise EngineUnavailable(f"CSM weights folder {path} does not exist; {hint}")
    config = path / "config.json"
    if not config.is_file():
        raise EngineUnavailable(f"{path} has no config.json, so it is not a transformers checkpoint; {hint}")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise EngineUnavailable(f"cannot read {config}: {exc}") from None
    if model_type != "csm":
        raise EngineUnavailable(f"{config} is for model_type {model_type!r}, not 'csm'; {hint}")


@contextmanager
def _hub_offline() -> Iterator[None]:
    """Make any Hub lookup fail fast while loading (belt and braces over ``local_files_only``)."""
    previous_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    # huggingface_hub reads the variable once at import; flip its constant too if it was imported earlier.
    import huggingface_hub.constants as hub_constants

    previous_flag = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = previous_flag
        if previous_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous_env


def _pieces(text: str) -> list[str]:
    """Sentences; ones longer than ``_MAX_PIECE_CHARS`` are cut at clauses, then between words."""
    out: list[str] = []
    for sentence in filter(None, (s.strip() for s in _SENTENCE.split(text))):
        if len(sentence) <= _MAX_PIECE_CHARS:
            out.append(sentence)
            continue
        for clause in filter(None, (c.strip() for c in _CLAUSE.split(sentence))):
            out.extend(_wrap(clause, _MAX_PIECE_CHARS))
    return out or [text.strip()]


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split():
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    if current:
        lines.append(current)
    return lines
