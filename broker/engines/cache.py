"""A small on-disk cache for per-input work that is costly to redo in every process.

What goes here is derived data whose inputs are named by its key: a portrait's mouth
table (found face + warped crops, keyed by the image's hash), a voice's optimised ONNX
graph (keyed by the model file and the runtime that optimised it). A second process
rendering the same avatar or loading the same voice reads the result instead of
importing torch/OpenCV or re-optimising the graph.

Rules that keep it safe to share between processes: writes go to a temporary file in the
same folder and are renamed into place (readers see a whole entry or none); anything that
cannot be read back — truncated, corrupt, from another version — counts as a miss and is
rebuilt; failing to write (read-only home, full disk) only costs the speed-up.

The folder is ``engines.cache_dir`` (``BROKER_ENGINES__CACHE_DIR``), else ``$BROKER_CACHE_DIR``,
else ``$XDG_CACHE_HOME/broker``, else ``~/.cache/broker``; ``off`` turns the cache off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, cast

import numpy as np

log = logging.getLogger(__name__)

#: bump when the layout of every entry changes; each kind also puts its own version in its key
FORMAT = 1
OFF = "off"

_configured: str | None = None


def configure(path: str | None) -> None:
    """Set the folder from settings (None: environment or the user cache; ``off``: no cache)."""
    global _configured
    _configured = path


def folder() -> Path | None:
    """Where entries live, or None when the cache is off."""
    chosen = _configured or os.environ.get("BROKER_CACHE_DIR")
    if chosen is None:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        chosen = str(Path(base) / "broker")
    if chosen.strip().lower() == OFF:
        return None
    return Path(chosen).expanduser()


def key(*parts: object) -> str:
    """A stable file-name-safe digest of ``parts`` (their ``repr``s, in order)."""
    h = hashlib.sha256(f"broker-cache-v{FORMAT}".encode())
    for part in parts:
        h.update(b"\0" + repr(part).encode())
    return h.hexdigest()[:40]


def path_for(kind: str, entry_key: str, suffix: str) -> Path | None:
    root = folder()
    return None if root is None else root / kind / f"{entry_key}{suffix}"


def load_arrays(kind: str, entry_key: str) -> dict[str, np.ndarray] | None:
    """The arrays saved under ``kind``/``entry_key``, or None (absent, unreadable or off)."""
    path = path_for(kind, entry_key, ".npz")
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except Exception as exc:  # truncated or corrupt (zipfile, ValueError, OSError...): a miss, rebuilt later
        log.warning("ignoring unreadable cache entry %s (%s: %s)", path, type(exc).__name__, exc)
        return None


def save_arrays(kind: str, entry_key: str, arrays: dict[str, np.ndarray]) -> Path | None:
    """Store ``arrays`` atomically; returns the path, or None when it could not be written."""
    path = path_for(kind, entry_key, ".npz")
    if path is None:
        return None
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **cast(dict[str, Any], arrays))  # (numpy's stub types **kwds as its bool flag)
    except OSError as exc:
        log.warning("could not write cache entry %s: %s", path, exc)
        return None
    return path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path``; renamed onto it if the block succeeds, removed otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with suppress(FileNotFoundError):
            tmp.unlink()
