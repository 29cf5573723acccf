"""A weight-free mouth animation: a displacement field applied with ``grid_sample``.

Below the lip line, each output pixel samples the still portrait ``o * F(x, y)``
pixels higher up (``o`` = openness of the frame, ``F`` fixed per portrait): the
lower lip and teeth drop by a lens-shaped amount (most at the centre, nothing at
the corners), the jaw drops with a smooth ramp that stretches the cheeks and
fades out under the chin. Sampling never reaches above the lip line, so the
opening between the lips is a stretched seam, painted over with a dark mouth
cavity. Only a crop around the mouth is warped, and comes back already in the
encoder's YUV 4:2:0.

Openness is quantised to quarter-pixel steps of the lip drop, and every level is
warped once, in one ``grid_sample`` batch, the first time a portrait is rendered:
after that a frame costs a table lookup and a paste, however long the video.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from broker.engines.face import Box, Portrait

# Motion amplitudes as fractions of the face height (Haar face box ≈ brows to chin).
_LIP_DROP = 0.06
_JAW_DROP = 0.05
_CAVITY_RGB = (46.0, 18.0, 22.0)
_CAVITY_MAX_ALPHA = 0.88
#: cap on cached openness levels (a 2048-pixel render would otherwise want ~225 of 375 KB each)
_MAX_LEVELS = 128
#: levels warped per grid_sample call when building the table: bounds float memory at large sizes
_TABLE_CHUNK = 16

# BT.601 limited range, the matrix H.264 players assume for untagged SD video (the stream is tagged too).
_RGB_TO_YUV = np.array(
    [[0.257, 0.504, 0.098], [-0.148, -0.291, 0.439], [0.439, -0.368, -0.071]], dtype=np.float32
)
_YUV_OFFSET = np.array([16.0, 128.0, 128.0], dtype=np.float32)


@dataclass(frozen=True)
class Planes:
    """YUV 4:2:0 planes of a batch: y is N x H x W, u and v are N x H/2 x W/2 (uint8 numpy)."""

    y: np.ndarray
    u: np.ndarray
    v: np.ndarray


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def mouth_crop(portrait: Portrait) -> Box:
    """The region the warp touches, on even pixel boundaries (chroma is subsampled 2x2)."""
    size = portrait.image.shape[0]
    _, _, fw, fh = portrait.face
    mx, my, mw, mh = portrait.mouth
    cx, lip = mx + mw / 2, my + mh / 2
    half_w = max(0.6 * fw, 0.8 * mw)
    x0 = int(max(0, np.floor((cx - half_w) / 2) * 2))
    x1 = int(min(size, np.ceil((cx + half_w) / 2) * 2))
    y0 = int(max(0, np.floor((lip - 0.1 * fh) / 2) * 2))
    y1 = int(min(size, np.ceil((lip + 0.7 * fh) / 2) * 2))
    return (x0, y0, x1 - x0, y1 - y0)


@dataclass(frozen=True)
class Field:
    """Per-portrait warp data in crop pixels: drop at full openness, the lip row, the cavity's width mask."""

    drop: np.ndarray  # h x w, pixels downward at openness 1 (0 above the lip line)
    lip: float  # lip line, crop rows
    cavity_x: np.ndarray  # 1 x w, 1 inside the lips' width, fading to 0 at the corners


def displacement(portrait: Portrait, crop: Box) -> Field:
    x0, y0, w, h = crop
    _, _, fw, fh = portrait.face
    mx, my, mw, mh = portrait.mouth
    cx, lip = mx + mw / 2, my + mh / 2
    xs = np.arange(x0, x0 + w, dtype=np.float32)[None, :]
    ys = np.arange(y0, y0 + h, dtype=np.float32)[:, None]
    below = ys >= lip
    # lower lip and teeth: a step at the lip line (this makes the opening), lens-shaped across the mouth,
    # fading out over the chin so the neck stays put
    lip_x = np.exp(-(((xs - cx) / (0.38 * mw)) ** 4))
    chin = lip + 0.3 * fh
    lip_y = below * (1 - _smoothstep((ys - (lip + 0.1 * fh)) / (0.3 * fh)))
    # jaw: a smooth ramp from the lip line (stretches the cheeks, no gap), as wide as the face
    jaw_x = np.exp(-(((xs - cx) / (0.4 * fw)) ** 4))
    jaw_y = _smoothstep((ys - lip) / (0.2 * fh)) * (1 - _smoothstep((ys - chin) / (0.3 * fh)))
    drop = _LIP_DROP * fh * lip_x * lip_y + _JAW_DROP * fh * jaw_x * jaw_y
    cavity_x = 1 - _smoothstep((np.abs(xs - cx) / (0.5 * mw) - 0.5) / 0.45)
    return Field(drop.astype(np.float32), float(lip - y0), cavity_x.astype(np.float32))


def rgb_to_yuv420(rgb: Any) -> tuple[Any, Any, Any]:
    """N x 3 x H x W float RGB (0-255, torch) → Y (N x H x W) and U, V (N x H/2 x W/2), float."""
    import torch

    m = torch.as_tensor(_RGB_TO_YUV, device=rgb.device)
    off = torch.as_tensor(_YUV_OFFSET, device=rgb.device)
    y = torch.einsum("c,nchw->nhw", m[0], rgb) + off[0]
    pooled = torch.nn.functional.avg_pool2d(rgb, 2)
    u = torch.einsum("c,nchw->nhw", m[1], pooled) + off[1]
    v = torch.einsum("c,nchw->nhw", m[2], pooled) + off[2]
    return y, u, v


def to_u8(x: Any) -> np.ndarray:
    import torch

    return torch.clamp(x.round(), 0, 255).to(torch.uint8).cpu().numpy()


def still_planes(portrait: Portrait) -> Planes:
    """The whole still frame in YUV, converted with the same arithmetic as the warped crops (no seams)."""
    import torch

    rgb = torch.from_numpy(portrait.image).permute(2, 0, 1)[None].float()
    y, u, v = rgb_to_yuv420(rgb)
    return Planes(to_u8(y)[0], to_u8(u)[0], to_u8(v)[0])


def level_index(openness: np.ndarray, levels: int) -> np.ndarray:
    """Openness in [0, 1] → row of a table with ``levels + 1`` rows (nearest level)."""
    o = np.clip(np.asarray(openness, dtype=np.float32), 0.0, 1.0)
    return np.rint(o * levels).astype(np.int64)


class MouthWarp:
    """Turns openness values into warped mouth crops (YUV) for one portrait."""

    def __init__(self, portrait: Portrait, device: str = "cpu") -> None:
        import torch

        self.device = torch.device(device)
        self.crop = mouth_crop(portrait)
        x0, y0, w, h = self.crop
        field = displacement(portrait, self.crop)
        ys = torch.arange(h, dtype=torch.float32, device=self.device).view(h, 1)
        xs = torch.linspace(-1, 1, w, device=self.device).view(1, w).expand(h, w)
        self._rows = ys.expand(h, w)
        self._floor = torch.clamp(ys, max=field.lip).expand(h, w)  # sampling never goes above the lip line
        self._gx = xs
        self._below = (ys >= field.lip).float().expand(h, w)
        self._to_norm = 2.0 / max(h - 1, 1)
        self._drop = torch.from_numpy(field.drop).to(self.device)
        self._cavity_x = torch.from_numpy(field.cavity_x).to(self.device)
        crop = portrait.image[y0 : y0 + h, x0 : x0 + w]
        self._still = torch.from_numpy(np.ascontiguousarray(crop)).to(self.device).permute(2, 0, 1)[None].float()
        self._cavity = torch.tensor(_CAVITY_RGB, device=self.device).view(1, 3, 1, 1)
        # quarter-pixel steps of the largest drop: finer than the eye can see, coarse enough to cache
        self.levels = int(np.clip(np.ceil(float(field.drop.max()) * 4), 16, _MAX_LEVELS))
        self._table: Planes | None = None
        self._portrait = portrait
        self._still_planes: Planes | None = None

    def rgb(self, openness: np.ndarray) -> Any:
        """N openness values → N x 3 x h x w float RGB crops (torch, on the warp's device)."""
        import torch
        import torch.nn.functional as nnf

        o = torch.as_tensor(np.asarray(openness, dtype=np.float32), device=self.device).view(-1, 1, 1)
        n = o.shape[0]
        shifted = self._rows - o * self._drop
        src_y = torch.maximum(shifted, self._floor)
        grid = torch.stack([self._gx.expand(n, -1, -1), src_y * self._to_norm - 1], dim=-1)
        warped = nnf.grid_sample(
            self._still.expand(n, -1, -1, -1), grid, mode="bilinear", padding_mode="border", align_corners=True
        )
        # the rows between the lips sampled the clamped seam: how far below it they sit is the opening
        depth = self._floor - shifted
        alpha = torch.clamp(depth, 0.0, 1.0) * self._below * self._cavity_x * _CAVITY_MAX_ALPHA
        alpha = alpha[:, None]
        return warped * (1 - alpha) + self._cavity * alpha

    def planes(self, openness: np.ndarray) -> Planes:
        y, u, v = rgb_to_yuv420(self.rgb(openness))
        return Planes(to_u8(y), to_u8(u), to_u8(v))

    def still(self) -> Planes:
        """The whole still frame as YUV planes (computed once)."""
        if self._still_planes is None:
            self._still_planes = still_planes(self._portrait)
        return self._still_planes

    def level_index(self, openness: np.ndarray) -> np.ndarray:
        """Which row of ``table()`` shows each openness value."""
        return level_index(openness, self.levels)

    def table(self) -> Planes:
        """Crops for every openness level 0..levels (one batch, computed once per portrait and device)."""
        if self._table is None:
            values = np.linspace(0.0, 1.0, self.levels + 1, dtype=np.float32)
            parts = [self.planes(values[i : i + _TABLE_CHUNK]) for i in range(0, len(values), _TABLE_CHUNK)]
            table = Planes(*(np.concatenate([getattr(p, c) for p in parts]) for c in "yuv"))
            # closed is the still portrait exactly (grid_sample's float coordinates may round a pixel apart)
            still = self.still()
            x0, y0, w, h = self.crop
            table.y[0] = still.y[y0 : y0 + h, x0 : x0 + w]
            table.u[0] = still.u[y0 // 2 : (y0 + h) // 2, x0 // 2 : (x0 + w) // 2]
            table.v[0] = still.v[y0 // 2 : (y0 + h) // 2, x0 // 2 : (x0 + w) // 2]
            self._table = table
        return self._table
