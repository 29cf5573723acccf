"""The one progressive audio writer: long work's stitcher and plain `broker speak` both write through it.

Samples go to the file as they arrive (soundfile for WAV/FLAC, PyAV for MP3/AAC/M4B), so memory stays
flat however long the book is. The file is written beside its destination under a hidden name and only
moved to the destination when the whole job succeeded; a job that stops early leaves its audio under an
explicit ``.partial`` name instead, so nothing misleading ever sits at ``-o``. M4B gets one chapter marker
per chapter (written into the moov at close, which is why chapters are collected as the audio goes by).
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
import wave
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from broker.errors import InvalidRequest
from broker.media import SAMPLE_RATE

#: extension → (container format, codec); None container = soundfile
FORMATS: dict[str, tuple[str | None, str]] = {
    ".wav": (None, "WAV"),
    ".flac": (None, "FLAC"),
    ".mp3": ("mp3", "libmp3lame"),
    ".m4a": ("ipod", "aac"),
    ".aac": ("adts", "aac"),
    ".m4b": ("ipod", "aac"),
}
_AAC_FRAME = 1024


def check_output_path(path: Path, field: str = "output") -> str:
    """The format for ``path``'s extension, or an ``InvalidRequest`` naming ``field``."""
    ext = path.suffix.lower()
    if ext not in FORMATS:
        raise InvalidRequest(field, f"unknown extension {ext or '(none)'!r}; use one of {', '.join(FORMATS)}")
    parent = path.expanduser().parent
    if not parent.is_dir():
        raise InvalidRequest(field, f"directory {parent} does not exist")
    if path.expanduser().is_dir():
        raise InvalidRequest(field, f"{path} is a directory")
    return ext


def in_progress(path: Path) -> Path | None:
    """The hidden file a writer for ``path`` is filling right now, if any (readers may follow it as it grows)."""
    path = path.expanduser()
    found = sorted(path.parent.glob(f".{glob.escape(path.name)}.*{glob.escape(path.suffix)}"),
                   key=lambda p: p.stat().st_mtime if p.exists() else 0.0)
    return found[-1] if found else None


def partial_path(path: Path) -> Path:
    """Where a stopped job's audio goes: ``book.partial.m4b`` beside ``book.m4b``."""
    return path.with_name(f"{path.stem}.partial{path.suffix}")


class AudioWriter:
    """``write(samples)`` in order, ``chapter(title)`` where one starts, then ``finish()`` or ``stop()``."""

    def __init__(self, path: Path, sample_rate: int = SAMPLE_RATE, *, bitrate: int = 64_000) -> None:
        self.path = path.expanduser()
        self.ext = check_output_path(self.path)
        self.sample_rate = sample_rate
        self.samples_written = 0
        self.chapters: list[tuple[int, str]] = []
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=self.path.suffix, dir=self.path.parent)
        except OSError as exc:  # read-only, /proc, no permission: refused before any provider is paid
            raise InvalidRequest("output", f"cannot write in {self.path.parent}: {exc.strerror}") from None
        os.close(fd)
        self.tmp = Path(tmp)
        container, codec = FORMATS[self.ext]
        self._sf: Any = None
        self._av: Any = None
        try:
            if codec == "WAV":
                self._sf = _WavSink(self.tmp, sample_rate)
            elif container is None:
                import soundfile as sf

                self._sf = sf.SoundFile(self.tmp, "w", sample_rate, 1, subtype="PCM_16", format=codec)
            else:
                self._open_av(container, codec, bitrate)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise

    def _open_av(self, container: str, codec: str, bitrate: int) -> None:
        import av

        self._av = av.open(str(self.tmp), "w", format=container)
        self._stream = self._av.add_stream(codec, rate=self.sample_rate, layout="mono")
        self._stream.bit_rate = bitrate
        self._pending = np.zeros(0, dtype=np.float32)
        self._pts = 0

    @property
    def seconds(self) -> float:
        return self.samples_written / self.sample_rate

    def chapter(self, title: str) -> None:
        """A chapter starts at the next sample written."""
        self.chapters.append((self.samples_written, title))

    def write(self, samples: np.ndarray) -> None:
        if not len(samples):
            return
        data = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
        self.samples_written += len(data)
        if self._sf is not None:
            self._sf.write(data)
            return
        self._pending = np.concatenate([self._pending, data]) if len(self._pending) else data
        self._encode(final=False)

    def _encode(self, final: bool) -> None:
        import av

        frame_len = getattr(self._stream.codec_context, "frame_size", 0) or _AAC_FRAME
        pos = 0
        while len(self._pending) - pos >= frame_len or (final and pos < len(self._pending)):
            chunk = np.ascontiguousarray(self._pending[pos:pos + frame_len])
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = self.sample_rate, self._pts, Fraction(1, self.sample_rate)
            self._av.mux(self._stream.encode(frame))
            self._pts += len(chunk)
            pos += len(chunk)
        self._pending = self._pending[pos:].copy()

    def _close(self) -> None:
        if self._sf is not None:
            self._sf.close()
            self._sf = None
        elif self._av is not None:
            self._encode(final=True)
            self._av.mux(self._stream.encode(None))
            if self.ext == ".m4b" and self.chapters:
                self._av.set_chapters(self._chapter_list())
            self._av.close()
            self._av = None

    def _chapter_list(self) -> list[dict[str, Any]]:
        tb = Fraction(1, self.sample_rate)
        starts = [s for s, _ in self.chapters] + [self.samples_written]
        return [{"id": i + 1, "start": s, "end": starts[i + 1], "time_base": tb, "metadata": {"title": t}}
                for i, (s, t) in enumerate(self.chapters)]

    def finish(self) -> Path:
        """Close the file and move it to its destination."""
        self._close()
        os.replace(self.tmp, self.path)
        _usual_mode(self.path)
        return self.path

    def stop(self, keep_partial: bool) -> Path | None:
        """Close early: keep what was written as ``<name>.partial<ext>`` (when anything was), else remove it."""
        try:
            self._close()
        except Exception:  # a half-written container may refuse to close; its bytes are still no use
            keep_partial = False
        if keep_partial and self.samples_written:
            dest = partial_path(self.path)
            os.replace(self.tmp, dest)
            _usual_mode(dest)
            return dest
        self.tmp.unlink(missing_ok=True)
        return None


class _WavSink:
    """16-bit mono WAV through the standard library: the same samples libsndfile 1.2 writes (x 32768, floored,
    clipped to int16), without loading it — most of ``broker speak`` writes a WAV, and start-up counts."""

    def __init__(self, path: Path, sample_rate: int) -> None:
        self._wav = wave.open(str(path), "wb")  # noqa: SIM115 (closed by close())
        self._wav.setnchannels(1)
        self._wav.setsampwidth(2)
        self._wav.setframerate(sample_rate)

    def write(self, data: np.ndarray) -> None:
        self._wav.writeframes(np.clip(np.floor(data * 32768.0), -32768, 32767).astype("<i2").tobytes())

    def close(self) -> None:
        self._wav.close()


def _usual_mode(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def chapter_file_name(index: int, title: str, ext: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", title).strip("-").lower()[:40] or "chapter"
    return f"{index + 1:02d}-{slug}{ext}"


__all__ = ["FORMATS", "AudioWriter", "chapter_file_name", "check_output_path", "in_progress", "partial_path"]
