"""H.264 + AAC in a fragmented MP4, written to memory with PyAV.

``h264_nvenc`` is used when it opens (a GPU machine with NVENC), else ``libx264``.
The MP4 is fragmented (``frag_keyframe+empty_moov``) so it can be streamed while
it is written; ``delay_moov`` is added because without it the fragmented muxer
cannot record the AAC encoder's priming delay (1024 samples) in an edit list, and
the audio would start ~43 ms late. Video frames arrive as YUV 4:2:0 planes, so the
encoder never converts colour; audio is interleaved as the frames go in.
"""

from __future__ import annotations

import io
import threading
from fractions import Fraction
from typing import Any

import numpy as np

from broker.errors import EngineUnavailable
from broker.media import Audio

MOVFLAGS = "frag_keyframe+empty_moov+delay_moov"
#: a keyframe (and so a fragment) every this many seconds: the streaming granularity
_KEYFRAME_S = 2.0
_AAC_FRAME = 1024
_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)

_nvenc_ok: bool | None = None
_nvenc_lock = threading.Lock()


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise EngineUnavailable("the render engine needs PyAV: pip install 'broker[local]'") from None
    return av


def frame_rate(fps: float) -> Fraction:
    """fps as an exact rational (29.97 → 30000/1001) so timestamps never drift."""
    return Fraction(fps).limit_denominator(1001)


#: encoder options: x264's veryfast preset is ~5x quicker than its default at a similar size for talking heads
_OPTIONS = {
    "libx264": {"preset": "veryfast", "crf": "23"},
    "h264_nvenc": {"preset": "p3", "rc": "vbr", "cq": "23"},
}


def nvenc_available() -> bool:
    """Whether ``h264_nvenc`` opens here (probed once per process: needs an NVIDIA GPU and driver)."""
    global _nvenc_ok
    with _nvenc_lock:
        if _nvenc_ok is None:
            av = _av()
            try:
                ctx = av.CodecContext.create("h264_nvenc", "w")
                ctx.width, ctx.height, ctx.pix_fmt = 256, 256, "yuv420p"
                ctx.time_base = Fraction(1, 25)
                ctx.options = dict(_OPTIONS["h264_nvenc"])
                ctx.open()
                _nvenc_ok = True
            except Exception:  # not compiled in, no device, no driver: all mean "use libx264"
                _nvenc_ok = False
    return _nvenc_ok


class Mp4Writer:
    """Feed ``write(y, u, v)`` once per frame, then ``finish()`` for the MP4 bytes."""

    def __init__(self, width: int, height: int, fps: float, audio: Audio, *, try_nvenc: bool = True) -> None:
        self.width, self.height = width, height
        self.rate = frame_rate(fps)
        self._audio_samples, self._audio_rate = _aac_input(audio)
        self._audio_done = 0
        self._frames = 0
        self._packed = np.empty(width * height * 3 // 2, dtype=np.uint8)
        self.codec = "libx264"
        if try_nvenc and nvenc_available():
            try:
                self._open("h264_nvenc")
                self.codec = "h264_nvenc"
                return
            except Exception:  # e.g. the GPU's limit of concurrent NVENC sessions is reached
                self.abort()
        self._open("libx264")

    def _open(self, codec: str) -> None:
        av = _av()
        self._buf = io.BytesIO()
        self._container = av.open(self._buf, "w", format="mp4", options={"movflags": MOVFLAGS})
        stream = self._container.add_stream(codec, rate=self.rate)
        stream.width, stream.height, stream.pix_fmt = self.width, self.height, "yuv420p"
        ctx = stream.codec_context
        ctx.gop_size = max(1, round(float(self.rate) * _KEYFRAME_S))
        # tag the colour matrix the frames were converted with (BT.601, limited range)
        ctx.colorspace = 6  # AVCOL_SPC_SMPTE170M
        ctx.color_range = 1  # AVCOL_RANGE_MPEG
        stream.options = dict(_OPTIONS[codec])
        if codec == "libx264":
            # Frame-parallel threads, as many as x264 picks for the cores present (what the ffmpeg CLI does).
            # PyAV's default thread type is SLICE, which x264 takes as sliced threads: they scale worse and,
            # at the same crf, make bigger files than one thread; frame threads give one thread's output.
            ctx.thread_type = "FRAME"
            ctx.thread_count = 0
        self._video = stream
        self._audio = self._container.add_stream("aac", rate=self._audio_rate, layout="mono")
        self._audio.bit_rate = 96_000
        # opens both encoders now, so a codec that cannot run fails here rather than mid-video
        self._container.start_encoding()

    @property
    def frames(self) -> int:
        return self._frames

    def write(self, y: np.ndarray, u: np.ndarray, v: np.ndarray) -> None:
        """One frame as planes: y is H x W, u and v are H/2 x W/2, uint8."""
        av = _av()
        n = self.width * self.height
        self._packed[:n] = y.reshape(-1)
        self._packed[n : n + n // 4] = u.reshape(-1)
        self._packed[n + n // 4 :] = v.reshape(-1)
        frame = av.VideoFrame.from_ndarray(self._packed.reshape(-1, self.width), format="yuv420p")
        frame.pts = self._frames
        frame.time_base = 1 / self.rate
        self._container.mux(self._video.encode(frame))
        self._frames += 1
        # keep audio level with video so every fragment carries both
        self._feed_audio(until_s=float(self._frames / self.rate))

    def _feed_audio(self, until_s: float | None) -> None:
        av = _av()
        total = len(self._audio_samples)
        end = total if until_s is None else min(total, int(float(until_s) * self._audio_rate))
        while self._audio_done < end and (until_s is None or end - self._audio_done >= _AAC_FRAME):
            chunk = self._audio_samples[self._audio_done : self._audio_done + _AAC_FRAME]
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
            frame.sample_rate = self._audio_rate
            frame.pts = self._audio_done
            frame.time_base = Fraction(1, self._audio_rate)
            self._container.mux(self._audio.encode(frame))
            self._audio_done += len(chunk)

    def finish(self) -> bytes:
        self._container.mux(self._video.encode(None))
        self._feed_audio(until_s=None)
        self._container.mux(self._audio.encode(None))
        self._container.close()
        return self._buf.getvalue()

    def abort(self) -> None:
        try:
            self._container.close()
        except Exception:  # closing a half-written container can fail; nothing to save
            pass


def _aac_input(audio: Audio) -> tuple[np.ndarray, int]:
    """Samples at a rate the AAC encoder takes (24 kHz is one, so usually unchanged)."""
    rate = audio.sample_rate
    if rate not in _AAC_RATES:
        audio = audio.resampled(48000)
        rate = 48000
    samples = np.ascontiguousarray(np.clip(audio.samples, -1.0, 1.0), dtype=np.float32)
    return samples, rate
