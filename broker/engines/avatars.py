"""Where a render's portrait comes from: caller bytes, a named preset, or the packaged default.

Presets are avatars analysed once (decoded, face and mouth found) and kept by
name, so a self-hosted worker can register its avatars at start-up and render
``avatar_preset="name"`` without any image upload or detection per job. Framed
portraits are cached per (avatar, size) too: a worker rendering many clips of
the same face pays detection and resizing once. Every avatar is named by the
hash of its bytes (``source_key``); the face boxes found for a hash are kept on
disk (``broker.engines.cache``), so another process skips detection as well.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from broker.engines import cache
from broker.engines.face import Analysis, Box, Portrait, analyse, frame_portrait
from broker.errors import InvalidRequest
from broker.types import RenderRequest

#: The default avatar: NASA's portrait of astronaut Eileen Collins (NASA Great Images GPN-2000-001177),
#: public domain as a work of NASA; the same image is scikit-image's ``astronaut`` sample.
DEFAULT_AVATAR = "avatar.jpg"
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

_lock = threading.Lock()
#: preset name → (hash of its image, its analysis)
_presets: dict[str, tuple[str, Analysis]] = {}
#: analyses of caller-supplied images, keyed by content hash: check() and render() share one detection
_recent: OrderedDict[str, Analysis] = OrderedDict()
_RECENT_MAX = 8
_portraits: OrderedDict[tuple[str, int], Portrait] = OrderedDict()
_PORTRAITS_MAX = 8
#: bump when detection or the mouth estimate changes what is found for an image
_FACE_VERSION = 1


def register_preset(name: str, image: bytes, *, mouth_box: Box | None = None) -> Analysis:
    """Analyse ``image`` now and keep it as ``name``; replaces an earlier preset of that name."""
    if not name or not name.strip():
        raise InvalidRequest("avatar_preset", "a preset needs a non-empty name")
    digest = _digest(image, mouth_box)
    analysis = _analyse(image, mouth_box, digest)
    with _lock:
        _presets[name] = (digest, analysis)
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


def preset_names() -> list[str]:
    with _lock:
        return sorted(_presets)


@lru_cache(maxsize=1)
def default_avatar_bytes() -> bytes:
    return resources.files("broker").joinpath("assets", DEFAULT_AVATAR).read_bytes()


def _digest(data: bytes, mouth_box: Box | None) -> str:
    return hashlib.sha256(data).hexdigest() + (f":{tuple(mouth_box)}" if mouth_box else "")


def _preset(request: RenderRequest) -> tuple[str, Analysis]:
    if request.mouth_box is not None:
        raise InvalidRequest("mouth_box", "a preset's mouth is found when it is registered; drop mouth_box")
    with _lock:
        found = _presets.get(request.avatar_preset)  # type: ignore[arg-type]
        known = sorted(_presets)
    if found is None:
        listing = ", ".join(known) if known else "none are registered on this worker"
        raise InvalidRequest("avatar_preset", f"unknown preset {request.avatar_preset!r} ({listing})")
    return found


def _check_choice(request: RenderRequest) -> None:
    if request.avatar is not None and request.avatar_preset is not None:
        raise InvalidRequest("avatar_preset", "give either avatar or avatar_preset, not both")


def source_key(request: RenderRequest) -> str:
    """What names the request's avatar everywhere (image hash + caller's mouth box), without decoding it."""
    _check_choice(request)
    if request.avatar_preset is not None:
        return _preset(request)[0]
    data = request.avatar if request.avatar is not None else default_avatar_bytes()
    return _digest(data, request.mouth_box)


def analysis_for(request: RenderRequest) -> tuple[str, Analysis]:
    """The analysed avatar a request asks for, and its ``source_key``; raises ``InvalidRequest`` for bad ones."""
    _check_choice(request)
    if request.avatar_preset is not None:
        return _preset(request)
    data = request.avatar if request.avatar is not None else default_avatar_bytes()
    key = _digest(data, request.mouth_box)
    with _lock:
        cached = _recent.get(key)
        if cached is not None:
            _recent.move_to_end(key)
            return key, cached
    analysis = _analyse(data, request.mouth_box, key)
    with _lock:
        _recent[key] = analysis
        while len(_recent) > _RECENT_MAX:
            _recent.popitem(last=False)
    return key, analysis


def _analyse(data: bytes, mouth_box: Box | None, digest: str) -> Analysis:
    """``analyse``, reusing the face and mouth boxes found for this image by an earlier process."""
    if mouth_box is not None:  # the caller's box: nothing to detect
        return analyse(data, mouth_box)
    entry = cache.key("face", _FACE_VERSION, digest)
    stored = cache.load_arrays("face", entry)
    if stored is not None:
        try:
            face, mouth = (tuple(int(v) for v in stored[name]) for name in ("face", "mouth"))
            found_by = str(stored["found_by"])
        except (KeyError, ValueError):
            stored = None
        else:
            return analyse(data, known=(face, mouth, found_by))  # type: ignore[arg-type]
    analysis = analyse(data)
    cache.save_arrays("face", entry, {
        "face": np.asarray(analysis.face, np.int64), "mouth": np.asarray(analysis.mouth, np.int64),
        "found_by": np.asarray(analysis.found_by),
    })
    return analysis


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
