"""The real generation code, shared by the local provider and every handler.

``synthesize``/``synthesize_stream``/``render`` are the three entry points. Engines
are built once per process (cold start pays once) and torch is imported lazily. Speech
engines are the built-ins (piper, csm) plus plugins (``broker.engines.registry``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from broker.errors import InvalidRequest
from broker.media import Audio, Video
from broker.types import RenderRequest, SpeechRequest

if TYPE_CHECKING:
    from broker.engines.base import SpeechEngine
    from broker.settings import EngineSettings

#: the built-in speech engines; ``available()`` says which engines (plugins included) run here
SPEECH_ENGINES = ("piper", "csm")

_engines: dict[str, SpeechEngine] = {}
_lock = threading.Lock()
_settings: EngineSettings | None = None
_device_pref = "auto"


def configure(settings: EngineSettings | None = None, device: str = "auto") -> None:
    """Point the engines at voices/weights and a device; drops engines built with older settings."""
    global _settings, _device_pref
    with _lock:
        _settings = settings
        _device_pref = device
        _engines.clear()


def device() -> str:
    """'cuda' when asked for or available (and torch is installed), else 'cpu'."""
    if _device_pref in ("cpu", "cuda"):
        return _device_pref
    if not _nvidia_device_present():
        # Importing torch costs seconds; with no NVIDIA device node there is nothing for it to find.
        return "cpu"
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _nvidia_device_present() -> bool:
    """Cheap check before importing torch: Linux exposes /dev/nvidia0.. when a driver is loaded."""
    import glob
    import sys

    if not sys.platform.startswith("linux"):
        return True  # no cheap check elsewhere: let torch decide
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def _engine_settings() -> EngineSettings:
    if _settings is not None:
        return _settings
    from broker.settings import Settings

    # Not configured by a host: the user's configuration (file and BROKER_ENGINES__* variables) applies.
    return Settings().engines


def speech_engine(name: str | None = None) -> SpeechEngine:
    """The engine called ``name`` (default: settings' default), built and loaded once."""
    from broker.engines import registry

    cfg = _engine_settings()
    name = name or cfg.default
    if name not in registry.names(cfg):
        raise InvalidRequest("engine", f"unknown engine {name!r}; choose one of {', '.join(registry.names(cfg))}")
    with _lock:
        engine = _engines.get(name)
        if engine is None:
            engine = registry.build(name, cfg, device())
            _engines[name] = engine
    engine.load()
    return engine


def available() -> list[str]:
    """The speech engines this process really has (installed and configured; plugins included)."""
    from broker.engines import registry

    return registry.available(_engine_settings())


def check(request: SpeechRequest | RenderRequest) -> None:
    """Engine-level validation (speaker exists, engine available) before any work starts."""
    if isinstance(request, SpeechRequest):
        speech_engine(request.engine).check(request)
        return
    if request.text is not None:
        speech_engine(request.engine).check(
            SpeechRequest(text=request.text, speaker=request.speaker, engine=request.engine)
        )
    from broker.engines.renderer import check_request

    check_request(request)


def synthesize(request: SpeechRequest, cancel: threading.Event | None = None) -> Audio:
    engine = speech_engine(request.engine)
    engine.check(request)
    return engine.synthesize(request, cancel)


def synthesize_stream(request: SpeechRequest, cancel: threading.Event | None = None) -> Iterator[Audio]:
    engine = speech_engine(request.engine)
    engine.check(request)
    return engine.stream(request, cancel)


def render(
    request: RenderRequest,
    *,
    progress: Callable[[float], None] | None = None,
    cancel: threading.Event | None = None,
) -> Video:
    """Talking-head MP4 of the request's avatar speaking its audio (synthesising ``text`` first)."""
    # The module is not called `render`: importing a submodule of that name would replace this function.
    from broker.engines.renderer import render_video

    return render_video(request, progress=progress, cancel=cancel)


def preload(names: tuple[str, ...] = ("piper",), *, render_engine: bool = True) -> None:
    """Load engines now (handlers call this at import so only the cold start pays)."""
    for name in names:
        speech_engine(name)
    if render_engine:
        from broker.engines.renderer import warm_up

        warm_up()
