"""Find the mouth in a portrait and frame the portrait as a square video frame.

OpenCV's bundled Haar cascades do the finding: they ship inside
``opencv-python-headless`` (``cv2.data.haarcascades``), need no weights download
and take a few milliseconds. OpenCV 5 dropped ``CascadeClassifier``, hence ``<5``.
Boxes are ``(x, y, w, h)`` in pixels throughout.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from broker.errors import EngineUnavailable, InvalidRequest
from broker.image_header import image_size
from broker.types import DEFAULT_LIMITS

Box = tuple[int, int, int, int]

#: smallest portrait we can find a face in and still draw a mouth on
_MIN_SIDE = 32
#: faces are searched on a copy no larger than this (detection time grows with area)
_DETECT_SIDE = 640
#: the output square is at most this many face-widths wide: head and shoulders, mouth big enough to see
_FRAME_FACE_WIDTHS = 4.0

_cascades: dict[str, Any] = {}
_cascade_lock = threading.Lock()


@dataclass(frozen=True, eq=False)
class Analysis:
    """A decoded portrait and where its face and mouth are (in its own pixels)."""

    image: np.ndarray  # RGB uint8, H x W x 3
    face: Box
    mouth: Box
    #: "cascade", "cascade+smile", or "caller" (mouth_box given)
    found_by: str


@dataclass(frozen=True, eq=False)  # identity equality: portraits key caches of their warps
class Portrait:
    """The square frame every video frame starts from, and the boxes in its pixels."""

    image: np.ndarray  # RGB uint8, size x size x 3
    face: Box
    mouth: Box


def _cv2() -> Any:
    try:
        import cv2
    except ImportError:
        raise EngineUnavailable("the render engine needs OpenCV: pip install 'broker[local]'") from None
    return cv2


def _cascade(name: str) -> Any:
    cv2 = _cv2()
    with _cascade_lock:
        found = _cascades.get(name)
        if found is None:
            found = cv2.CascadeClassifier(cv2.data.haarcascades + name)
            if found.empty():
                raise EngineUnavailable(f"OpenCV's {name} is missing from cv2.data.haarcascades")
            _cascades[name] = found
    return found


def decode_image(data: bytes, max_pixels: int = DEFAULT_LIMITS.max_image_pixels) -> np.ndarray:
    """Encoded image bytes → RGB uint8; anything OpenCV cannot decode is the caller's mistake.

    The size comes from the header first: a small file may declare a picture of gigabytes."""
    size = image_size(data)
    if size is None:
        raise InvalidRequest("avatar", "is not an image (it could not be decoded as PNG, JPEG, WebP, GIF or BMP)")
    if size[0] * size[1] > max_pixels:
        raise InvalidRequest("avatar", f"is {size[0]}x{size[1]} pixels, over the limit of {max_pixels:,} pixels")
    cv2 = _cv2()
    buf = np.frombuffer(data, dtype=np.uint8)
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR) if len(buf) else None
    if bgr is None:
        raise InvalidRequest("avatar", "is not an image (it could not be decoded as PNG, JPEG, WebP, GIF or BMP)")
    h, w = bgr.shape[:2]
    if min(h, w) < _MIN_SIDE:
        raise InvalidRequest("avatar", f"is {w}x{h} pixels; a portrait needs at least {_MIN_SIDE} on each side")
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def find_face(rgb: np.ndarray) -> Box | None:
    """The largest frontal face, or None."""
    cv2 = _cv2()
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    scale = min(1.0, _DETECT_SIDE / max(gray.shape))
    if scale < 1.0:
        gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    gray = cv2.equalizeHist(gray)
    min_side = max(24, min(gray.shape) // 12)
    faces = _cascade("haarcascade_frontalface_default.xml").detectMultiScale(
        gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side)
    )
    if len(faces) == 0:
        return None
    x, y, w, h = max((tuple(int(v) for v in f) for f in faces), key=lambda f: f[2] * f[3])
    return (round(x / scale), round(y / scale), round(w / scale), round(h / scale))


def mouth_from_face(rgb: np.ndarray, face: Box) -> tuple[Box, str]:
    """Where the mouth sits in a Haar face box, refined by the smile cascade when it agrees.

    In a Haar frontal-face box the lips sit about 78% of the way down, centred, about
    45% of the face wide. The smile cascade is noisy, so its answer is only taken when it
    lands near that estimate.
    """
    fx, fy, fw, fh = face
    guess = (round(fx + 0.28 * fw), round(fy + 0.70 * fh), round(0.44 * fw), round(0.17 * fh))
    cv2 = _cv2()
    top = fy + fh // 2
    lower = rgb[top : min(rgb.shape[0], fy + round(1.1 * fh)), max(0, fx) : fx + fw]
    if lower.size == 0:
        return guess, "cascade"
    gray = cv2.equalizeHist(cv2.cvtColor(np.ascontiguousarray(lower), cv2.COLOR_RGB2GRAY))
    smiles = _cascade("haarcascade_smile.xml").detectMultiScale(
        gray, scaleFactor=1.1, minNeighbors=15, minSize=(max(8, fw // 5), max(4, fh // 12))
    )
    gx, gy = guess[0] + guess[2] / 2, guess[1] + guess[3] / 2
    best: Box | None = None
    best_dist = float("inf")
    for sx, sy, sw, sh in smiles:
        cx, cy = fx + sx + sw / 2, top + sy + sh / 2
        dist = float(np.hypot((cx - gx) / fw, (cy - gy) / fh))
        if dist < 0.12 and 0.25 * fw <= sw <= 0.7 * fw and dist < best_dist:
            best, best_dist = (int(fx + sx), int(top + sy), int(sw), int(sh)), dist
    if best is None:
        return guess, "cascade"
    # The smile box is loose vertically; keep its centre and width, the usual lip height.
    bx, by, bw, bh = best
    height = guess[3]
    return (bx, round(by + bh / 2 - height / 2), bw, height), "cascade+smile"


def face_from_mouth(mouth: Box) -> Box:
    """Inverse of ``mouth_from_face``: a face box consistent with a caller-given mouth."""
    mx, my, mw, mh = mouth
    fw = max(mw / 0.44, 4 * mh)
    fh = fw
    cx, cy = mx + mw / 2, my + mh / 2
    return (round(cx - fw / 2), round(cy - 0.785 * fh), round(fw), round(fh))


def analyse(data: bytes, mouth_box: Box | None = None) -> Analysis:
    """Decode and locate; raises ``InvalidRequest`` (field ``avatar``/``mouth_box``) for what cannot work."""
    rgb = decode_image(data)
    h, w = rgb.shape[:2]
    if mouth_box is not None:
        x, y, bw, bh = mouth_box
        if x + bw > w or y + bh > h:
            raise InvalidRequest("mouth_box", f"{mouth_box} reaches outside the {w}x{h} avatar")
        return Analysis(rgb, face_from_mouth(mouth_box), mouth_box, "caller")
    face = find_face(rgb)
    if face is None:
        raise InvalidRequest(
            "avatar", "no face found in the image; use a front-facing portrait or pass mouth_box=(x, y, w, h)"
        )
    mouth, how = mouth_from_face(rgb, face)
    return Analysis(rgb, face, mouth, how)


def frame_portrait(analysis: Analysis, size: int) -> Portrait:
    """Crop a square centred on the face (at most a few face-widths wide) and resize it to ``size``."""
    cv2 = _cv2()
    img = analysis.image
    h, w = img.shape[:2]
    fx, fy, fw, fh = analysis.face
    side = int(min(h, w, max(round(_FRAME_FACE_WIDTHS * fw), _MIN_SIDE)))
    cx, cy = fx + fw / 2, fy + fh / 2
    x0 = int(np.clip(round(cx - side / 2), 0, w - side))
    y0 = int(np.clip(round(cy - side / 2), 0, h - side))
    # A caller's mouth box must stay inside the frame even when it is far from the estimated face.
    mx, my, mw, mh = analysis.mouth
    x0 = int(np.clip(x0, max(0, mx + mw - side), min(mx, w - side)))
    y0 = int(np.clip(y0, max(0, my + mh - side), min(my, h - side)))
    square = img[y0 : y0 + side, x0 : x0 + side]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    out = cv2.resize(square, (size, size), interpolation=interp) if side != size else square.copy()
    s = size / side

    def move(box: Box) -> Box:
        bx, by, bw, bh = box
        return (round((bx - x0) * s), round((by - y0) * s), max(1, round(bw * s)), max(1, round(bh * s)))

    return Portrait(np.ascontiguousarray(out), move(analysis.face), move(analysis.mouth))
