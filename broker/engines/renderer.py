"""Talking-head render: portrait + speech → H.264/AAC MP4.

The steps, each in its own module: find the mouth and frame the portrait
(``face``, ``avatars``), turn the audio into per-frame mouth openness
(``mouth``), warp a crop around the mouth for every openness level in one batch
(``warp``, torch ``grid_sample`` on CUDA or CPU), paste the crops into the still
frame's YUV planes and encode (``encode``, PyAV). Bad avatars are rejected before
any speech is synthesised or any frame drawn. The portrait's part (face found,
crops warped) is kept by image hash in memory and on disk (``mouth_table``), so a
render of a known avatar needs neither OpenCV nor torch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from broker.engines import avatars, mouth_table
from broker.engines.base import check_cancel
from broker.engines.encode import Mp4Writer, nvenc_available
from broker.engines.mouth import openness
from broker.engines.mouth_table import MouthTable
from broker.errors import BrokerError, EngineUnavailable, JobFailed
from broker.media import Audio, Video, frames_for
from broker.types import RenderRequest, SpeechRequest

log = logging.getLogger(__name__)

#: frames between progress reports and cancel checks
_BATCH = 64


def check_request(request: RenderRequest) -> None:
    """Everything about a render that can be wrong before work starts (the avatar, mostly)."""
    if mouth_table.cached(request, _device()) is not None:
        return  # this avatar was analysed (and so accepted) before
    avatars.portrait_for(request)


def render_video(
    request: RenderRequest,
    *,
    progress: Callable[[float], None] | None = None,
    cancel: threading.Event | None = None,
) -> Video:
    from broker import engines

    try:
        device = engines.device()
        table = mouth_table.table_for(request, device)
        check_cancel(cancel)
        audio = _audio(request, cancel)
        return _render(audio, table, request, device, progress, cancel)
    except BrokerError:
        raise
    except ImportError as exc:
        raise EngineUnavailable(f"the render engine cannot run here: {exc}; pip install 'broker[local]'") from None
    except Exception as exc:
        log.exception("render failed")
        raise JobFailed(f"render failed: {type(exc).__name__}: {exc}") from exc


def _audio(request: RenderRequest, cancel: threading.Event | None) -> Audio:
    if request.audio is not None:
        return request.audio
    from broker import engines

    assert request.text is not None
    speech = SpeechRequest(text=request.text, speaker=request.speaker, engine=request.engine)
    return engines.synthesize(speech, cancel, timings=True)  # phoneme timings drive the mouth


def _render(
    audio: Audio,
    face: MouthTable,
    request: RenderRequest,
    device: str,
    progress: Callable[[float], None] | None,
    cancel: threading.Event | None,
) -> Video:
    fps, size = request.fps, request.size
    frames = frames_for(audio.duration_s, fps)
    shapes = openness(audio, fps, frames)
    table, still = face.table, face.still
    levels = face.level_index(shapes)
    x0, y0, w, h = face.crop
    cy, cx = slice(y0 // 2, (y0 + h) // 2), slice(x0 // 2, (x0 + w) // 2)
    # one frame buffer, reused: only the mouth crop changes between frames
    y, u, v = still.y.copy(), still.u.copy(), still.v.copy()
    writer = Mp4Writer(size, size, fps, audio, try_nvenc=device == "cuda")
    try:
        for start in range(0, frames, _BATCH):
            check_cancel(cancel)
            for level in levels[start : start + _BATCH]:
                y[y0 : y0 + h, x0 : x0 + w] = table.y[level]
                u[cy, cx] = table.u[level]
                v[cy, cx] = table.v[level]
                writer.write(y, u, v)
            if progress is not None:
                progress(min(start + _BATCH, frames) / frames)
        check_cancel(cancel)
        data = writer.finish()
    except BaseException:
        writer.abort()
        raise
    log.debug("rendered %d frames with %s on %s", frames, writer.codec, device)
    return Video(data, fps, writer.frames, size, size, audio.duration_s)


def warm_up() -> None:
    """Analyse the default avatar (or read its table) and open PyAV, so the first job pays none of it."""
    request = RenderRequest(audio=Audio([0.0] * 2400))
    mouth_table.table_for(request, _device())
    nvenc_available()


def _device() -> str:
    from broker import engines

    return engines.device()
