"""Where a render's portrait comes from: caller bytes, a named preset, or the packaged default.

Presets are avatars analysed once (decoded, face and mouth found) and kept by
name, so a self-hosted worker can register its avatars at start-up and render
``avatar_preset="name"`` without any image upload or detection per job. Framed
portraits are cached per (avatar, size) too: a worker rendering many clips of
the same face pays detection and resizing once.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from functools import lru_cache
from importlib import resources
from pathlib import Path

from broker.engines.face import Analysis, Box, Portrait, analyse, frame_portrait
from broker.errors import InvalidRequest
from broker.types import RenderRequest

#: The default avatar: NASA's portrait of astronaut Eileen Collins (NASA Great Images GPN-2000-001177),
#: public domain as a work of NASA; the same image is scikit-image's ``astronaut`` sample.
DEFAULT_AVATAR = "avatar.jpg"
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

_lock = threading.Lock()
_presets: dict[str, Analysis] = {}
#: analyses of caller-supplied images, keyed by content hash: check() and render() share one detection
_recent: OrderedDict[str, Analysis] = OrderedDict()
_RECENT_MAX = 8
_portraits: OrderedDict[tuple[str, int], Portrait] = OrderedDict()
_PORTRAITS_MAX = 8


def register_preset(name: str, image: bytes, *, mouth_box: Box | None = None) -> Analysis:
    """Analyse ``image`` now and keep it as ``name``; replaces an earlier preset of that name."""
    if not name or not name.strip():
        raise InvalidRequest("avatar_preset", "a preset needs a non-empty name")
    analysis = analyse(image, mouth_box)
    with _lock:
        _presets[name] = analysis
        for key in [k for k in _portraits if k[0] == f"preset:{name}"]:
            del _portraits[key]
    return analysis


def register_directory(folder: str | Path) -> list[str]:
    """Register every image in ``folder`` as a preset named after its file stem; returns the names."""
    names = []
    for path in sorted(Path(folder).iterdir()):
        if path.suffix.lower() in _IMAGE_SUFFIXES and path.is_file():
            register_preset(path.stem, path.read_bytes())
            names.append(path.stem)
    return names


def unregister_preset(name: str) -> None:
    with _lock:
        _presets.pop(name, None)
        for key in [k for k in _portraits if k[0] == f"preset:{name}"]:
            del _portraits[key]


def preset_names() -> list[str]:
    with _lock:
        return sorted(_presets)


@lru_cache(maxsize=1)
def default_avatar_bytes() -> bytes:
    return resources.files("broker").joinpath("assets", DEFAULT_AVATAR).read_bytes()


def analysis_for(request: RenderRequest) -> tuple[str, Analysis]:
    """The analysed avatar a request asks for, and a cache key; raises ``InvalidRequest`` for bad ones."""
    if request.avatar is not None and request.avatar_preset is not None:
        raise InvalidRequest("avatar_preset", "give either avatar or avatar_preset, not both")
    if request.avatar_preset is not None:
        if request.mouth_box is not None:
            raise InvalidRequest("mouth_box", "a preset's mouth is found when it is registered; drop mouth_box")
        with _lock:
            found = _presets.get(request.avatar_preset)
            known = sorted(_presets)
        if found is None:
            listing = ", ".join(known) if known else "none are registered on this worker"
            raise InvalidRequest("avatar_preset", f"unknown preset {request.avatar_preset!r} ({listing})")
        return f"preset:{request.avatar_preset}", found
    data = request.avatar if request.avatar is not None else default_avatar_bytes()
    key = hashlib.sha256(data).hexdigest() + (f":{request.mouth_box}" if request.mouth_box else "")
    with _lock:
        cached = _recent.get(key)
        if cached is not None:
            _recent.move_to_end(key)
            return key, cached
    analysis = analyse(data, request.mouth_box)
    with _lock:
        _recent[key] = analysis
        while len(_recent) > _RECENT_MAX:
            _recent.popitem(last=False)
    return key, analysis


def portrait_for(request: RenderRequest) -> Portrait:
    """The square start frame for ``request`` at its output size."""
    key, analysis = analysis_for(request)
    with _lock:
        cached = _portraits.get((key, request.size))
        if cached is not None:
            _portraits.move_to_end((key, request.size))
            return cached
    portrait = frame_portrait(analysis, request.size)
    with _lock:
        _portraits[(key, request.size)] = portrait
        while len(_portraits) > _PORTRAITS_MAX:
            _portraits.popitem(last=False)
    return portrait
