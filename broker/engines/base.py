"""What a speech engine is: load once, check a request, make 24 kHz mono audio (whole or in pieces)."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator

from broker.errors import JobCancelled
from broker.media import SAMPLE_RATE, Audio
from broker.types import SpeechRequest


class SpeechEngine(ABC):
    name: str = "engine"
    sample_rate: int = SAMPLE_RATE

    @abstractmethod
    def load(self) -> None:
        """Load weights; idempotent. Raises ``EngineUnavailable`` when it cannot run here."""

    @abstractmethod
    def speakers(self) -> list[str]:
        """Names of the speakers, in id order (speaker N = speakers()[N])."""

    def check(self, request: SpeechRequest) -> None:
        """Raise ``InvalidRequest`` for what this engine cannot do (unknown speaker, ...), before running."""
        names = self.speakers()
        spk = request.speaker
        if isinstance(spk, int):
            if spk >= len(names):
                raise_invalid_speaker(spk, names)
        elif spk not in names:
            raise_invalid_speaker(spk, names)

    @abstractmethod
    def stream(self, request: SpeechRequest, cancel: threading.Event | None = None) -> Iterator[Audio]:
        """Audio pieces in order, each at ``sample_rate``; the first one should come quickly."""

    def synthesize(self, request: SpeechRequest, cancel: threading.Event | None = None) -> Audio:
        return self._concat(self.stream(request, cancel))

    def synthesize_timed(self, request: SpeechRequest, cancel: threading.Event | None = None) -> Audio:
        """Audio with phoneme timings where the engine can make them (renders drive the mouth with them).

        Engines whose timings cost extra to load give them only here; by default it is ``synthesize``.
        """
        return self.synthesize(request, cancel)

    def _concat(self, pieces: Iterator[Audio]) -> Audio:
        got = list(pieces)
        if not got:
            return Audio([], self.sample_rate)
        return got[0] if len(got) == 1 else Audio.concat(got)

    @property
    def device(self) -> str:
        return "cpu"


def raise_invalid_speaker(speaker: int | str, names: list[str]) -> None:
    from broker.errors import InvalidRequest

    known = ", ".join(f"{i} ({n})" for i, n in enumerate(names))
    raise InvalidRequest("speaker", f"unknown speaker {speaker!r}; this engine has: {known}")


def check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise JobCancelled("cancelled while generating")
