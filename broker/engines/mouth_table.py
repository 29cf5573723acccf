"""A portrait's mouth table: the still frame and the warped mouth crop for every openness level, in YUV.

Building one needs OpenCV (decode, find the face, frame the portrait) and torch
(``grid_sample``, see ``warp``); using one needs neither — a frame is a table lookup and
a paste. So tables are kept per (avatar hash, size, device) in memory and on disk
(``broker.engines.cache``): the second render of an avatar, in this process or the
next, imports neither library and goes straight to encoding.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from broker.engines import avatars, cache
from broker.engines.face import Box
from broker.engines.warp import Planes, level_index
from broker.types import RenderRequest

log = logging.getLogger(__name__)

#: bump when the warp or the framing changes the pixels a table holds
VERSION = 1
_KIND = "mouth-table"
_MEMORY_MAX = 8

_lock = threading.Lock()
_memory: OrderedDict[str, MouthTable] = OrderedDict()


@dataclass(frozen=True, eq=False)
class MouthTable:
    """Everything a render needs from its portrait."""

    crop: Box  # where the mouth crops go in the frame (even x, y, w, h)
    levels: int  # openness steps: table rows are levels 0..levels
    table: Planes  # N x crop YUV planes, row 0 = the still crop exactly
    still: Planes  # the whole still frame

    def level_index(self, openness: np.ndarray) -> np.ndarray:
        """Which table row shows each openness value."""
        return level_index(openness, self.levels)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "crop": np.asarray(self.crop, np.int64), "levels": np.asarray(self.levels, np.int64),
            "ty": self.table.y, "tu": self.table.u, "tv": self.table.v,
            "sy": self.still.y, "su": self.still.u, "sv": self.still.v,
        }

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray], size: int) -> MouthTable:
        """Rebuild from ``arrays()``; ``ValueError``/``KeyError`` when the entry does not fit ``size``."""
        x0, y0, w, h = (int(v) for v in a["crop"])
        levels = int(a["levels"])
        n = levels + 1
        want = {
            "ty": (n, h, w), "tu": (n, h // 2, w // 2), "tv": (n, h // 2, w // 2),
            "sy": (size, size), "su": (size // 2, size // 2), "sv": (size // 2, size // 2),
        }
        for name, shape in want.items():
            if a[name].shape != shape or a[name].dtype != np.uint8:
                raise ValueError(f"{name} is {a[name].dtype}{a[name].shape}, expected uint8{shape}")
        if x0 < 0 or y0 < 0 or x0 + w > size or y0 + h > size:
            raise ValueError(f"crop {(x0, y0, w, h)} is outside a {size}-pixel frame")
        return cls((x0, y0, w, h), levels, Planes(a["ty"], a["tu"], a["tv"]), Planes(a["sy"], a["su"], a["sv"]))


def _key(request: RenderRequest, device: str) -> str:
    return cache.key(_KIND, VERSION, avatars.source_key(request), request.size, device)


def cached(request: RenderRequest, device: str) -> MouthTable | None:
    """The table for ``request`` if memory or disk has it (no decoding, detection or warping)."""
    key = _key(request, device)
    with _lock:
        found = _memory.get(key)
        if found is not None:
            _memory.move_to_end(key)
            return found
    stored = cache.load_arrays(_KIND, key)
    if stored is None:
        return None
    try:
        table = MouthTable.from_arrays(stored, request.size)
    except (KeyError, ValueError, TypeError) as exc:
        log.warning("ignoring a mouth table that does not fit this render: %s", exc)
        return None
    _remember(key, table)
    return table


def table_for(request: RenderRequest, device: str) -> MouthTable:
    """The request's table: from memory or disk, else built (decode, detect, warp) and stored."""
    found = cached(request, device)
    if found is not None:
        return found
    from broker.engines.warp import MouthWarp  # torch comes with building, never with using

    started = time.perf_counter()
    portrait = avatars.portrait_for(request)
    warp = MouthWarp(portrait, device)
    table = MouthTable(warp.crop, warp.levels, warp.table(), warp.still())
    log.debug("built a %d-level mouth table for a %d px portrait on %s in %.0f ms", warp.levels, request.size,
              device, 1000 * (time.perf_counter() - started))
    key = _key(request, device)
    _remember(key, table)
    cache.save_arrays(_KIND, key, table.arrays())
    return table


def _remember(key: str, table: MouthTable) -> None:
    with _lock:
        _memory[key] = table
        while len(_memory) > _MEMORY_MAX:
            _memory.popitem(last=False)
