"""Long renders: audio cut at pauses into segments, rendered side by side, joined into one MP4.

Cuts fall in the quietest 20 ms near every ``segment_s`` seconds, snapped to a frame boundary (so each
segment's frame count is exact: with 24 kHz audio at 25 fps a frame is 960 samples). Each segment is one
routed render job through the manager. The join decodes each segment's pictures in order and encodes
them into one H.264 stream while the *original* audio is encoded once alongside (continuous AAC, no
priming gap at each join), so timestamps run on without a break and the total frame count is exactly
``frames_for(audio length, fps)``. The result is a fragmented MP4 (moov first, a fragment per keyframe):
it can be played while it downloads. Segments may come from different providers (NVENC or x264), which is
why the pictures are re-encoded rather than the packets copied.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from broker.errors import BrokerError, InvalidRequest, PieceFailed
from broker.media import Audio, Video, frames_for
from broker.types import RenderRequest, build

SEGMENT_S = 20.0
_SEARCH_S = 3.0
_WINDOW_S = 0.02


def cut_points(samples: np.ndarray, rate: int, fps: float, segment_s: float = SEGMENT_S) -> list[int]:
    """Sample offsets where segments start (0 first), at pauses and on frame boundaries."""
    per_frame = Fraction(rate) / Fraction(fps).limit_denominator(1001)
    if per_frame.denominator != 1:
        raise InvalidRequest("fps", f"a long render needs a whole number of audio samples per frame "
                                    f"({rate} Hz / {fps:g} fps is not); use 24, 25, 30, 48, 50 or 60 fps")
    step = int(per_frame)
    win = max(1, int(rate * _WINDOW_S))
    cuts = [0]
    target = int(segment_s * rate)
    while cuts[-1] + target + int(_SEARCH_S * rate) < len(samples):
        lo = cuts[-1] + target - int(_SEARCH_S * rate)
        hi = cuts[-1] + target + int(_SEARCH_S * rate)
        region = np.square(samples[lo:hi])
        n = len(region) // win
        energy = region[: n * win].reshape(n, win).mean(axis=1)
        quiet = lo + int(np.argmin(energy)) * win + win // 2
        cuts.append(max(cuts[-1] + step, round(quiet / step) * step))
    return cuts


@dataclass
class RenderResult:
    video: Video
    segments: int
    cost_usd: float
    providers: dict[str, int] = field(default_factory=dict)
    attempts: list[dict[str, Any]] = field(default_factory=list)


async def render_long(manager: Any, audio: Audio, *, fps: float = 25.0, size: int = 512, avatar: bytes | None = None,
                      speaker: int | str = 0, workers: int = 4, segment_s: float = SEGMENT_S) -> RenderResult:
    """Render ``audio`` of any length: segments in parallel (at most ``workers`` at once), joined in order."""
    videos = await render_segments(manager, audio, fps=fps, size=size, avatar=avatar, speaker=speaker,
                                   workers=workers, segment_s=segment_s)
    data, frames = await asyncio.to_thread(join_segments, videos, audio, fps)
    providers: dict[str, int] = {}
    attempts = []
    cost = 0.0
    for i, v in enumerate(videos):
        rep = v.report
        if rep is None:
            continue
        cost += rep.cost_usd
        if rep.provider:
            providers[rep.provider] = providers.get(rep.provider, 0) + 1
        attempts.append({"segment": i, "provider": rep.provider, "attempts": [a.outcome for a in rep.attempts]})
    first = videos[0]
    joined = Video(data, fps, frames, first.width, first.height, audio.duration_s)
    return RenderResult(joined, len(videos), cost, providers, attempts)


async def render_segments(manager: Any, audio: Audio, *, fps: float = 25.0, size: int = 512,
                          avatar: bytes | None = None, speaker: int | str = 0, workers: int = 4,
                          segment_s: float = SEGMENT_S) -> list[Video]:
    """Each segment's video, in order (at most ``workers`` rendering at once)."""
    if workers < 1:
        raise InvalidRequest("workers", "must be at least 1")
    cuts = [*cut_points(audio.samples, audio.sample_rate, fps, segment_s), len(audio)]
    requests = [build(RenderRequest, audio=Audio(audio.samples[a:b], audio.sample_rate), fps=fps, size=size,
                      avatar=avatar, speaker=speaker) for a, b in itertools.pairwise(cuts)]
    for r in requests:
        r.check_limits(manager.settings.limits)
    gate = asyncio.Semaphore(workers)

    async def one(i: int, request: RenderRequest) -> Video:
        async with gate:
            try:
                out = await manager.arun(request)
            except BrokerError as exc:
                raise PieceFailed(f"render segment {i} ({cuts[i] / audio.sample_rate:.1f} s in) failed: "
                                  f"{exc.message}", getattr(exc, "attempts", ()), piece=i) from None
            assert isinstance(out, Video)
            return out

    tasks = [asyncio.ensure_future(one(i, r)) for i, r in enumerate(requests)]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def join_segments(videos: Sequence[Video], audio: Audio, fps: float) -> tuple[bytes, int]:
    """One fragmented MP4: every segment's pictures in order, re-encoded, over the original audio."""
    import io

    import av

    from broker.engines.encode import Mp4Writer

    width, height = videos[0].width, videos[0].height
    writer = Mp4Writer(width, height, fps, audio)
    try:
        for v in videos:
            if (v.width, v.height) != (width, height):
                raise InvalidRequest("size", "segments came back at different sizes")
            with av.open(io.BytesIO(v.data), "r") as container:
                for frame in container.decode(video=0):
                    planes = frame.to_ndarray(format="yuv420p")
                    y = planes[:height]
                    chroma = planes[height:].reshape(2, height // 2, width // 2)
                    writer.write(y, chroma[0], chroma[1])
        want = frames_for(audio.duration_s, fps)
        if writer.frames != want:
            raise PieceFailed(f"the joined render has {writer.frames} frames for {audio.duration_s:.2f} s of "
                              f"audio; expected {want}")
        frames = writer.frames
        return writer.finish(), frames
    except BaseException:
        writer.abort()
        raise


__all__ = ["RenderResult", "cut_points", "join_segments", "render_long", "render_segments"]
