"""H.264 + AAC in a fragmented MP4, written to memory with PyAV.

``h264_nvenc`` is used when it opens (a GPU machine with NVENC), else ``libx264``.
The MP4 is fragmented (``frag_keyframe+empty_moov``) so it can be streamed while
it is written; ``delay_moov`` is added because without it the fragmented muxer
cannot record the AAC encoder's priming delay (1024 samples) in an edit list, and
the audio would start ~43 ms late. Video frames arrive as YUV 4:2:0 planes, so the
encoder never converts colour.

The whole audio track is known before the first frame, so a thread encodes it to AAC beside the
video (PyAV lets go of the GIL inside the encoders): AAC is about a third of a 10 s render's
encoding time on two cores, and x264's frame threads leave room. Its packets are muxed as the frames
go in, never behind the video, so every fragment carries both.
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
        self._aac: _AudioEncoder | None = None
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
        self._aac = _AudioEncoder(self._audio, self._audio_samples, self._audio_rate)
        self._aac.start()

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
        self._mux_audio(until_sample=int(self._frames * self._audio_rate / self.rate))

    def _mux_audio(self, until_sample: int | None) -> None:
        assert self._aac is not None
        for packet in self._aac.take(until_sample):
            self._container.mux(packet)

    def finish(self) -> bytes:
        self._container.mux(self._video.encode(None))
        self._mux_audio(until_sample=None)
        self._container.close()
        return self._buf.getvalue()

    def abort(self) -> None:
        if self._aac is not None:
            self._aac.stop()
        try:
            self._container.close()
        except Exception:  # closing a half-written container can fail; nothing to save
            pass


class _AudioEncoder(threading.Thread):
    """The whole track to AAC packets, frame by frame, on its own thread; ``take`` hands over what is done."""

    def __init__(self, stream: Any, samples: np.ndarray, rate: int) -> None:
        super().__init__(name="broker-aac", daemon=True)
        self._stream, self._samples, self._rate = stream, samples, rate
        self._cond = threading.Condition()
        self._packets: list[Any] = []
        self._encoded = 0  # samples handed to the encoder so far
        self._finished = False
        self._stopped = False
        self._error: BaseException | None = None

    def run(self) -> None:
        av = _av()
        total = len(self._samples)
        try:
            for start in range(0, total, _AAC_FRAME):
                if self._stopped:
                    return
                chunk = self._samples[start : start + _AAC_FRAME]
                frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
                frame.sample_rate = self._rate
                frame.pts = start
                frame.time_base = Fraction(1, self._rate)
                packets = self._stream.encode(frame)
                with self._cond:
                    self._packets.extend(packets)
                    self._encoded = start + len(chunk)
                    self._cond.notify_all()
            packets = self._stream.encode(None)  # drain the encoder's delay
            with self._cond:
                self._packets.extend(packets)
        except BaseException as exc:  # handed to the writer's thread by take()
            with self._cond:
                self._error = exc
        finally:
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def take(self, until_sample: int | None) -> list[Any]:
        """The packets encoded so far, once the encoder has taken in audio up to ``until_sample`` (None: all)."""
        want = len(self._samples) if until_sample is None else min(until_sample, len(self._samples))
        with self._cond:
            self._cond.wait_for(lambda: self._finished if until_sample is None
                                else self._finished or self._encoded >= want)
            if self._error is not None:
                raise EngineUnavailable(f"the AAC encoder failed: {self._error}") from self._error
            packets, self._packets = self._packets, []
        return packets

    def stop(self) -> None:
        self._stopped = True
        self.join()


def _aac_input(audio: Audio) -> tuple[np.ndarray, int]:
    """Samples at a rate the AAC encoder takes (24 kHz is one, so usually unchanged)."""
    rate = audio.sample_rate
    if rate not in _AAC_RATES:
        audio = audio.resampled(48000)
        rate = 48000
    samples = np.ascontiguousarray(np.clip(audio.samples, -1.0, 1.0), dtype=np.float32)
    return samples, rate
