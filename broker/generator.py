"""A drop-in for Sesame CSM's ``Generator``: ``load_csm_1b()`` → ``broker.load_generator()``.

CSM's README does::

    generator = load_csm_1b(device="cuda")
    audio = generator.generate(text="Hello", speaker=0, context=[], max_audio_length_ms=10_000)
    torchaudio.save("audio.wav", audio.unsqueeze(0).cpu(), generator.sample_rate)

The object returned here has the same ``generate`` signature and ``sample_rate``,
and returns a 1-D float32 torch tensor; the work runs wherever the manager routes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from broker.media import SAMPLE_RATE
from broker.types import Segment

if TYPE_CHECKING:
    from broker.providers.base import Provider
    from broker.routing.manager import CloudGPUManager
    from broker.settings import Settings


class Generator:
    """CSM-shaped facade over a provider (the manager by default)."""

    sample_rate: int = SAMPLE_RATE

    def __init__(self, provider: Provider) -> None:
        self.provider = provider

    def generate(
        self,
        text: str,
        speaker: int,
        context: Sequence[Segment] = (),
        max_audio_length_ms: float = 90_000,
        temperature: float = 0.9,
        topk: int = 50,
    ) -> Any:
        audio = self.provider.generate_speech(
            text, speaker, list(context), max_audio_length_ms, temperature=temperature, topk=topk,
            **({"return_tensor": False} if _is_manager(self.provider) else {}),
        )
        return audio.to_torch()


def _is_manager(provider: Provider) -> bool:
    from broker.routing.manager import CloudGPUManager

    return isinstance(provider, CloudGPUManager)


def load_generator(
    device: str | None = None,
    *,
    providers: Sequence[Any] | None = None,
    settings: Settings | None = None,
    manager: CloudGPUManager | None = None,
) -> Generator:
    """Swap for ``load_csm_1b()``. ``device`` is accepted for signature compatibility and pins the
    local fallback's device ("cuda"/"cpu"); routing follows the settings."""
    from broker.routing.manager import CloudGPUManager
    from broker.settings import Settings

    if manager is None:
        settings = settings or Settings()
        if device is not None:
            settings.local.device = device
        manager = CloudGPUManager(providers, settings=settings)
    return Generator(manager)
