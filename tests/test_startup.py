"""Issue 15: each job loads only what it needs, per-portrait work is cached on disk, streams do not hold pieces."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest

from broker.engines.base import SpeechEngine
from broker.media import SAMPLE_RATE, Audio, AudioChunk
from broker.providers.base import BackgroundJob, Billing, Job, JobState, Request
from broker.testing.fake import FakeProvider
from broker.types import SpeechRequest
from tests.conftest import modules_after
from tests.media_support import speechlike

#: what `broker speak` must not import: the render stack, torch, and the onnx package behind alignments
RENDER_OR_ALIGNMENT = ("torch", "cv2", "av", "onnx", "transformers")


# -- load only what the job needs ------------------------------------------------------------------
@pytest.mark.usefixtures("piper_available")
def test_speak_imports_neither_the_render_stack_nor_alignments(tmp_path: Path) -> None:
    out = tmp_path / "hi.wav"
    code = ("import sys\nfrom broker.cli import app\n"
            f"sys.argv = ['broker', 'speak', 'Hi.', '-o', {str(out)!r}]\n"
            "try:\n    app()\nexcept SystemExit as e:\n    assert not e.code, e.code\n")
    modules, _ = modules_after(code)
    assert out.stat().st_size > 1000
    assert "piper" in modules and "onnxruntime" in modules  # the probe does see what speech loads
    assert [m for m in RENDER_OR_ALIGNMENT if m in modules] == []


@pytest.mark.usefixtures("piper_available")
def test_only_renders_get_phoneme_timings() -> None:
    from broker import engines
    from broker.types import SpeechRequest

    request = SpeechRequest(text="Open wide, Bob.")
    assert not engines.synthesize(request).phonemes
    timed = engines.synthesize(request, timings=True)
    assert timed.phonemes and timed.phonemes[-1].end_s <= timed.duration_s + 0.05
    # once the aligned graph is loaded it also serves plain speech: one graph per voice, not two
    voice = engines.speech_engine("piper")._voices[0]  # type: ignore[attr-defined]
    assert voice.session(alignments=False) is voice.session(alignments=True)


@pytest.mark.usefixtures("piper_available")
def test_a_corrupt_optimised_voice_graph_is_ignored_and_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    from broker.engines import piper_load
    from broker.engines.piper_engine import _packaged_voice

    monkeypatch.setenv("BROKER_CACHE_DIR", str(tmp_path))
    model = _packaged_voice()
    first = piper_load.load_voice(model, alignments=False, use_cuda=False)
    (saved,) = (tmp_path / "onnx").glob("*.onnx")
    saved.write_bytes(b"not an onnx graph")
    with caplog.at_level(logging.WARNING, logger="broker.engines.piper_load"):
        again = piper_load.load_voice(model, alignments=False, use_cuda=False)
    assert "ignoring unreadable optimised graph" in caplog.text
    assert saved.stat().st_size > 1_000_000  # rewritten whole
    for voice in (first, again):
        audio = np.concatenate([c.audio_float_array for c in voice.synthesize("Hello.")])
        assert len(audio) > 5000 and np.isfinite(audio).all()


# -- per-portrait work is cached on disk by image hash -----------------------------------------------
_RENDER = """
import logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(name)s %(message)s")
from pathlib import Path
from broker import engines
from broker.media import Audio
from broker.types import RenderRequest
request = RenderRequest(audio=Audio.from_file({wav!r}), avatar=Path({avatar!r}).read_bytes(), size=192)
Path({out!r}).write_bytes(engines.render(request).data)
"""


def _frames(data: bytes) -> np.ndarray:
    import av

    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="yuv420p") for f in container.decode(video=0)])


def test_second_render_of_an_avatar_skips_detection_and_warping(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    cv2 = pytest.importorskip("cv2")
    from broker.engines import avatars

    # a portrait no other test has rendered: the packaged one with one pixel changed (a new hash)
    image = cv2.imdecode(np.frombuffer(avatars.default_avatar_bytes(), np.uint8), cv2.IMREAD_COLOR)
    image[0, 0] = (image[0, 0].astype(int) + 7) % 256
    avatar = tmp_path / "face.png"
    avatar.write_bytes(cv2.imencode(".png", image)[1].tobytes())
    wav = tmp_path / "speech.wav"
    speechlike(1.2).save(wav)
    env = {"BROKER_CACHE_DIR": str(tmp_path / "cache")}
    runs = []
    for i in range(2):
        out = tmp_path / f"out{i}.mp4"
        modules, log = modules_after(_RENDER.format(wav=str(wav), avatar=str(avatar), out=str(out)), env)
        runs.append((modules, log, _frames(out.read_bytes())))
    (first_modules, first_log, first), (second_modules, second_log, second) = runs
    assert "detected face" in first_log and "built a" in first_log and "torch" in first_modules
    assert "detected face" not in second_log and "built a" not in second_log
    assert "torch" not in second_modules and "cv2" not in second_modules  # neither is needed any more
    assert first.shape == second.shape and np.array_equal(first, second)
    assert len(list((tmp_path / "cache" / "mouth-table").glob("*.npz"))) == 1


def test_cache_entries_that_cannot_be_read_are_misses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.engines import cache
    from broker.engines.mouth_table import MouthTable
    from broker.engines.warp import Planes

    monkeypatch.setenv("BROKER_CACHE_DIR", str(tmp_path))
    key = cache.key("test", uuid.uuid4().hex)
    assert cache.load_arrays("t", key) is None
    path = cache.save_arrays("t", key, {"a": np.arange(5)})
    assert path is not None and np.array_equal(cache.load_arrays("t", key)["a"], np.arange(5))  # type: ignore[index]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left behind
    path.write_bytes(path.read_bytes()[:40])  # truncated, as by a crash mid-copy
    assert cache.load_arrays("t", key) is None
    # a well-formed entry for another frame size is refused rather than pasted out of bounds
    y, uv = np.zeros((2, 8, 8), np.uint8), np.zeros((2, 4, 4), np.uint8)
    table = MouthTable((0, 0, 8, 8), 1, Planes(y, uv, uv), Planes(y[0], uv[0], uv[0]))
    assert MouthTable.from_arrays(table.arrays(), 8).crop == (0, 0, 8, 8)
    with pytest.raises(ValueError):
        MouthTable.from_arrays(table.arrays(), 16)
    monkeypatch.setenv("BROKER_CACHE_DIR", "off")
    assert cache.folder() is None and cache.save_arrays("t", key, {"a": np.arange(2)}) is None


# -- the manager's stream passes each piece on at once ------------------------------------------------
class _GatedJob(BackgroundJob):
    """Streams one piece, then makes its second only when ``gate`` is set; marks it final, as old workers do."""

    def __init__(self, provider: _GatedProvider, request: Request) -> None:
        super().__init__(provider.name, uuid.uuid4().hex, request)
        self._gate = provider.gate
        self._pieces = [speechlike(2.0, seed=1), speechlike(2.0, seed=2)]
        self._streamed = asyncio.Event()
        self._start()

    async def _run(self) -> None:
        self._set_state(JobState.RUNNING)
        await self._streamed.wait()
        self.billing = Billing(billed_seconds=0.1, cost_usd=0.0, estimated=True, hardware="fake-gpu",
                               run_seconds=0.1)
        self._succeed(Audio.concat(self._pieces))

    async def stream(self) -> AsyncIterator[AudioChunk]:
        yield AudioChunk(self._pieces[0], 0)
        await self._gate.wait()
        yield AudioChunk(self._pieces[1], 1, final=True)
        self._streamed.set()


class _GatedProvider(FakeProvider):
    def __init__(self) -> None:
        super().__init__("gated")
        self.gate = asyncio.Event()

    async def submit(self, request: Request, *, stream: bool = False) -> Job:
        return _GatedJob(self, request)


async def test_first_chunk_reaches_the_caller_before_the_provider_makes_the_second() -> None:
    from tests.test_manager import TEXT, manager

    provider = _GatedProvider()
    m = manager(provider)
    chunks = m.astream_speech(TEXT)
    first = await asyncio.wait_for(anext(chunks), 10)  # a manager holding pieces back would wait here forever
    assert first.index == 0 and not first.final and len(first.audio) == 2 * SAMPLE_RATE
    provider.gate.set()
    rest = [c async for c in chunks]
    # the provider's `final` on its last piece becomes a separate end marker, sent after validation
    assert [(c.index, c.final, len(c.audio)) for c in rest] == [(1, False, 2 * SAMPLE_RATE), (2, True, 0)]
    assert rest[-1].is_end
    assert m.last_report is not None and [a.outcome for a in m.last_report.attempts] == ["succeeded"]


@pytest.mark.usefixtures("piper_available")
async def test_local_stream_ends_with_a_marker_and_stopping_there_abandons_nothing() -> None:
    from broker.routing.manager import CloudGPUManager
    from tests.test_manager import settings

    s = settings()
    s.manager.fallback_local = True
    m = CloudGPUManager([], settings=s)
    got = []
    async for chunk in m.astream_speech("First sentence here. And a second one follows it."):
        got.append(chunk)
        if chunk.final:
            break  # a consumer that stops at the end marker
    assert got[-1].is_end and all(len(c.audio) and not c.final for c in got[:-1]) and len(got) >= 3
    assert [c.index for c in got] == list(range(len(got)))
    assert m.last_report is not None and [a.outcome for a in m.last_report.attempts] == ["succeeded"]


class _GatedEngine(SpeechEngine):
    """A speech engine whose second piece waits for the test (swapped in for Piper in the engine registry)."""

    name = "piper"

    def __init__(self) -> None:
        self.gate = threading.Event()

    def load(self) -> None:
        pass

    def speakers(self) -> list[str]:
        return ["gated"]

    def stream(self, request: SpeechRequest, cancel: threading.Event | None = None) -> Iterator[Audio]:
        yield speechlike(2.0, seed=3)
        if not self.gate.wait(10):
            raise TimeoutError("nobody asked for the second piece")
        yield speechlike(2.0, seed=4)


async def test_local_provider_passes_the_first_piece_on_before_the_engine_makes_the_second(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from broker import engines
    from broker.routing.manager import CloudGPUManager
    from tests.test_manager import TEXT, settings

    s = settings()
    s.manager.fallback_local = True
    m = CloudGPUManager([], settings=s)  # builds the local provider, which configures the engines
    gated = _GatedEngine()
    monkeypatch.setitem(engines._engines, "piper", gated)
    chunks = m.astream_speech(TEXT)
    first = await asyncio.wait_for(anext(chunks), 8)  # held back until the next piece, this would time out
    assert first.index == 0 and not first.final and len(first.audio) == 2 * SAMPLE_RATE
    gated.gate.set()
    rest = [c async for c in chunks]
    assert [(c.index, c.final, len(c.audio)) for c in rest] == [(1, False, 2 * SAMPLE_RATE), (2, True, 0)]
    assert m.last_report is not None and m.last_report.provider == "local"


# -- the encoder uses the cores, at the same quality -------------------------------------------------
def test_libx264_encodes_with_frame_threads_at_the_same_crf_and_preset() -> None:
    import re

    av = pytest.importorskip("av")
    from broker.engines import encode

    audio = speechlike(1.0)
    writer = encode.Mp4Writer(96, 64, 25, audio, try_nvenc=False)
    rng = np.random.default_rng(0)
    for _ in range(25):
        writer.write(rng.integers(0, 256, (64, 96), dtype=np.uint8), np.full((32, 48), 128, np.uint8),
                     np.full((32, 48), 128, np.uint8))
    data = writer.finish()
    # x264 writes the settings it ran with into the stream (an SEI message)
    found = re.search(rb"x264 - core .*? options: (.*?)\x00", data, re.S)
    assert found is not None
    options = dict(kv.split("=", 1) for kv in found.group(1).decode().split() if "=" in kv)
    assert options["sliced_threads"] == "0"  # frame threads: one thread's output, spread over the cores
    if (os.cpu_count() or 1) >= 2:
        assert int(options["threads"]) >= 2
    assert options["crf"] == "23.0" and options["subme"] == "2" and options["ref"] == "1"  # crf 23, veryfast
    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray(format="yuv420p") for f in container.decode(video=0)]
    assert len(frames) == 25 and frames[0].shape == (64 * 3 // 2, 96)


# -- fewer copies of the audio, the same file -----------------------------------------------------------
@pytest.mark.parametrize("peak", [0.9, 1.5])
def test_saving_writes_the_same_file_without_an_encoded_copy(tmp_path: Path, peak: float) -> None:
    import soundfile as sf

    samples = np.random.default_rng(0).uniform(-peak, peak, 48_000).astype(np.float32)
    audio = Audio(samples)
    for fmt in ("wav", "flac"):
        reference = io.BytesIO()
        sf.write(reference, np.clip(samples, -1.0, 1.0), SAMPLE_RATE, format=fmt.upper(), subtype="PCM_16")
        path = audio.save(tmp_path / f"out.{fmt}")
        assert path.read_bytes() == reference.getvalue() == audio.to_bytes(fmt)
    assert np.array_equal(audio.samples, samples)  # clipping for the file never touches the audio itself


def test_the_cache_folder_comes_from_settings_then_the_environment(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from broker import engines
    from broker.engines import cache
    from broker.settings import EngineSettings

    monkeypatch.setenv("BROKER_CACHE_DIR", str(tmp_path / "env"))
    try:
        engines.configure(EngineSettings(cache_dir=str(tmp_path / "set")))
        assert cache.folder() == tmp_path / "set"
        engines.configure(EngineSettings())
        assert cache.folder() == tmp_path / "env"
        monkeypatch.delenv("BROKER_CACHE_DIR")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert cache.folder() == tmp_path / "xdg" / "broker"
    finally:
        engines.configure(None)


def test_the_worker_sends_the_first_piece_before_the_engine_makes_the_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """What every handler streams (RunPod, Modal, Cog, `broker worker serve`): no piece waits for the next."""
    from broker import engines, wire
    from broker.types import build
    from broker.worker import handle_stream
    from tests.test_manager import TEXT

    gated = _GatedEngine()
    monkeypatch.setitem(engines._engines, "piper", gated)
    stream = handle_stream(wire.encode_request(build(SpeechRequest, text=TEXT), stream=True))
    got: dict[str, object] = {}
    reader = threading.Thread(target=lambda: got.update(first=next(stream)), daemon=True)
    reader.start()
    reader.join(8)  # held back until the engine made the next piece, it would still be waiting on the gate
    assert "first" in got
    index, final, audio, _ = wire.decode_chunk(got["first"])
    assert (index, final, len(audio)) == (0, False, 2 * SAMPLE_RATE)
    gated.gate.set()
    rest = [wire.decode_chunk(p) for p in stream]
    # then the second piece, and the end: a chunk of its own, final, with no samples and no words
    assert [(i, f, len(a)) for i, f, a, _ in rest] == [(1, False, 2 * SAMPLE_RATE), (2, True, 0)]
    assert rest[-1][3] == "" and rest[-1][2].sample_rate == audio.sample_rate
