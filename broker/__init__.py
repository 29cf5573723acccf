"""broker: run speech and talking-head rendering on the cheapest healthy GPU provider.

``import broker`` is light: no torch, no provider SDK. Heavy parts load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from broker.errors import (
    AllProvidersFailed,
    BrokerError,
    BudgetExceeded,
    EngineUnavailable,
    InvalidRequest,
    ProviderError,
)

if TYPE_CHECKING:
    from broker.generator import Generator, load_generator
    from broker.media import SAMPLE_RATE, Audio, AudioChunk, Video
    from broker.providers.base import Provider
    from broker.routing.manager import CloudGPUManager
    from broker.settings import Settings
    from broker.types import JobReport, Quote, RenderRequest, Segment, SpeechRequest

__version__ = "0.1.0"

__all__ = [
    "SAMPLE_RATE",
    "AllProvidersFailed",
    "Audio",
    "AudioChunk",
    "BrokerError",
    "BudgetExceeded",
    "CloudGPUManager",
    "EngineUnavailable",
    "Generator",
    "InvalidRequest",
    "JobReport",
    "Provider",
    "ProviderError",
    "Quote",
    "RenderRequest",
    "Segment",
    "Settings",
    "SpeechRequest",
    "Video",
    "load_generator",
]

# Loaded on first use: even numpy and pydantic wait until a name that needs them is touched, so the CLI
# (and any ``import broker.x``) starts with only what its command imports.
_LAZY = {
    "SAMPLE_RATE": "broker.media",
    "Audio": "broker.media",
    "AudioChunk": "broker.media",
    "Video": "broker.media",
    "JobReport": "broker.types",
    "Quote": "broker.types",
    "RenderRequest": "broker.types",
    "Segment": "broker.types",
    "SpeechRequest": "broker.types",
    "CloudGPUManager": "broker.routing.manager",
    "Generator": "broker.generator",
    "load_generator": "broker.generator",
    "Provider": "broker.providers.base",
    "Settings": "broker.settings",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'broker' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
