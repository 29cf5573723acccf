"""Price catalog and performance profiles (minimal first version; the manager issue grows it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.types import Quote, RenderRequest, SpeechRequest, estimate_speech_seconds

if TYPE_CHECKING:
    from broker.providers.base import Provider

#: measured on a 2-core CPU with Piper joe-medium (docs/PERFORMANCE.md)
_CPU_SPEECH_RTF = 0.09
_CPU_RENDER_FPS = 25.0


def quote_for(provider: Provider, request: SpeechRequest | RenderRequest) -> Quote:
    if isinstance(request, SpeechRequest):
        audio_s = estimate_speech_seconds(request.text)
        run_s = audio_s * _CPU_SPEECH_RTF
    else:
        audio_s = request.audio_seconds_hint()
        run_s = audio_s * request.fps / _CPU_RENDER_FPS
    return Quote(
        provider=provider.name,
        hardware=provider.capabilities.hardware,
        expected_seconds=run_s,
        expected_usd=0.0,
        breakdown={"queue": 0.0, "cold_start": 0.0, "run": run_s},
        basis="estimate",
    )


def cost_for(provider: str, hardware: str, billed_seconds: float) -> float:
    """Dollars for ``billed_seconds`` of ``hardware`` at ``provider`` from the catalog (0 when unknown)."""
    return 0.0
