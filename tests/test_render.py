"""The talking-head render engine: real MP4s decoded with PyAV, real Haar cascades, real Piper speech."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")
cv2 = pytest.importorskip("cv2")
pytest.importorskip("torch")

from broker import engines  # noqa: E402
from broker.engines import avatars, mouth  # noqa: E402
from broker.engines.warp import MouthWarp  # noqa: E402
from broker.errors import InvalidRequest, JobCancelled  # noqa: E402
from broker.media import SAMPLE_RATE, Audio, PhonemeTiming, Video, frames_for  # noqa: E402
from broker.providers.local import LocalProvider  # noqa: E402
from broker.types import RenderRequest, build  # noqa: E402
from tests.conftest import run_cli  # noqa: E402
from tests.media_support import speechlike  # noqa: E402

GARBAGE_PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


def png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def flat_grey(side: int = 256) -> bytes:
    return png(np.full((side, side, 3), 128, np.uint8))


def decode(data: bytes) -> dict:
    """Streams, frames (RGB) and decoded audio length of an MP4."""
    with av.open(io.BytesIO(data)) as container:
        codecs = {s.type: s.codec_context.name for s in container.streams}
        rate = container.streams.audio[0].codec_context.sample_rate
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    with av.open(io.BytesIO(data)) as container:
        samples = sum(f.samples for f in container.decode(audio=0))
    return {"codecs": codecs, "frames": np.stack(frames), "audio_s": samples / rate}


def motion(frames: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Mean per-pixel standard deviation over time inside ``box``."""
    x, y, w, h = box
    region = frames[:, y : y + h, x : x + w].astype(np.float32)
    return float(region.std(axis=0).mean())


def check_video(video: Video, audio_seconds: float, fps: float = 25.0) -> np.ndarray:
    expected = frames_for(audio_seconds, fps)
    assert video.frames == expected
    got = decode(video.data)
    assert got["codecs"] == {"video": "h264", "audio": "aac"}
    frames = got["frames"]
    assert len(frames) == expected
    assert frames.shape[1:] == (video.height, video.width, 3)
    # the picture lasts as long as the sound, to within one frame
    assert abs(len(frames) / fps - audio_seconds) <= 1 / fps
    # AAC decodes in 1024-sample frames: all the audio is there, padded by less than one AAC frame
    assert audio_seconds - 1e-3 <= got["audio_s"] <= audio_seconds + 1024 / SAMPLE_RATE + 1e-3
    return frames


def assert_mouth_moves(frames: np.ndarray, mouth_box: tuple[int, int, int, int], still_box: tuple) -> None:
    x, y, w, h = mouth_box
    # the lower lip and jaw move below the lip line: look at the box and a little under it
    moving = motion(frames, (x, y, w, h + h))
    still = motion(frames, still_box)
    assert moving > 4.0, f"mouth barely moves (std {moving:.2f})"
    assert moving > 5 * still, f"mouth std {moving:.2f} vs still region {still:.2f}"


def test_render_from_audio_moves_the_mouth() -> None:
    audio = speechlike(1.5)
    request = build(RenderRequest, audio=audio)
    seen: list[float] = []
    video = engines.render(request, progress=seen.append)
    frames = check_video(video, audio.duration_s)
    assert seen and seen[-1] == 1.0 and seen == sorted(seen)
    portrait = avatars.portrait_for(request)
    fx, fy, fw, _ = portrait.face
    forehead = (fx + fw // 4, fy + 2, fw // 2, fw // 6)
    assert_mouth_moves(frames, portrait.mouth, forehead)
    assert motion(frames, (0, 0, 96, 96)) < 1.5  # background corner


def test_render_twice_in_one_process() -> None:
    # the engine module must not shadow broker.engines.render (a submodule named `render` would)
    for _ in range(2):
        assert isinstance(engines.render(build(RenderRequest, audio=speechlike(0.3))), Video)


def test_render_from_text_uses_phonemes(piper_available: bool) -> None:
    request = build(RenderRequest, text="Hello there, Bob. Open wide!", fps=20, size=256)
    video = engines.render(request)
    assert (video.width, video.height, video.fps) == (256, 256, 20)
    frames = check_video(video, video.audio_seconds, fps=20)
    portrait = avatars.portrait_for(request)
    fx, fy, fw, _ = portrait.face
    assert_mouth_moves(frames, portrait.mouth, (fx + fw // 4, fy + 2, fw // 2, fw // 6))


def test_visemes_close_for_m_and_open_for_a() -> None:
    assert mouth.viseme("m") == mouth.viseme("b") == mouth.viseme("p") == 0.0
    assert mouth.viseme("a") == 1.0 and 0 < mouth.viseme("f") < mouth.viseme("ə") < 1.0  # type: ignore[operator]
    # "ma" then silence: closed, wide open, closed again
    track = [PhonemeTiming("m", 0.0, 0.2), PhonemeTiming("a", 0.2, 0.6), PhonemeTiming(".", 0.6, 1.0)]
    shape = mouth.from_phonemes(track, fps=25, frames=25)
    assert shape[1] < 0.1 and shape[10] > 0.9 and shape[-1] < 0.05


def test_loudness_is_closed_in_silence_and_open_in_sound() -> None:
    rate = SAMPLE_RATE
    silent = np.zeros(rate, np.float32)
    assert not mouth.loudness(silent, rate, 25, 25).any()
    sound = speechlike(1.0).samples
    clip = np.concatenate([silent, sound, silent])
    env = mouth.openness(Audio(clip), 25, 75)
    assert env[:20].max() == 0.0 and env[-15:].max() < 0.05
    assert env[25:50].max() > 0.5


def test_warp_at_rest_is_the_still_portrait() -> None:
    request = build(RenderRequest, audio=speechlike(0.2))
    portrait = avatars.portrait_for(request)
    warp = MouthWarp(portrait)
    still, table = warp.still(), warp.table()
    x, y, w, h = warp.crop
    # openness 0 leaves the crop exactly as the still frame (no seam where it is pasted back)
    assert np.array_equal(table.y[0], still.y[y : y + h, x : x + w])
    assert np.array_equal(table.u[0], still.u[y // 2 : (y + h) // 2, x // 2 : (x + w) // 2])
    # full openness darkens the middle of the mouth (the cavity)
    mx, my, mw, mh = portrait.mouth
    centre = (slice(my + mh // 2 - y, my + mh - y), slice(mx + mw // 3 - x, mx + 2 * mw // 3 - x))
    assert table.y[-1][centre].mean() < table.y[0][centre].mean() - 20


def test_not_an_image_is_rejected() -> None:
    request = build(RenderRequest, audio=speechlike(0.5), avatar=GARBAGE_PNG)
    with pytest.raises(InvalidRequest) as info:
        engines.render(request)
    assert info.value.field == "avatar" and "not an image" in info.value.message


def test_no_face_is_rejected_before_speech_runs() -> None:
    request = build(RenderRequest, text="This would take a while to say.", avatar=flat_grey(), engine="nope")
    # the avatar is checked first: the unknown engine is never reached
    with pytest.raises(InvalidRequest) as info:
        engines.render(request)
    assert info.value.field == "avatar" and "no face" in info.value.message and "mouth_box" in info.value.message


def test_mouth_box_on_a_faceless_image_works() -> None:
    rng = np.random.default_rng(1)
    image = np.full((200, 200, 3), 128, np.uint8)
    image[:, :, 0] = np.clip(rng.normal(128, 25, (200, 200)), 0, 255)  # texture so the warp shows
    box = (80, 120, 40, 12)
    audio = speechlike(1.0)
    request = build(RenderRequest, audio=audio, avatar=png(image), mouth_box=box, size=200)
    video = engines.render(request)
    frames = check_video(video, audio.duration_s)
    portrait = avatars.portrait_for(request)
    assert portrait.mouth == box  # the whole 200x200 image is the frame, unscaled
    assert_mouth_moves(frames, box, (10, 10, 40, 40))


def test_mouth_box_outside_the_image_is_rejected() -> None:
    request = build(RenderRequest, audio=speechlike(0.2), avatar=flat_grey(100), mouth_box=(90, 90, 20, 5))
    with pytest.raises(InvalidRequest) as info:
        engines.render(request)
    assert info.value.field == "mouth_box"


def test_presets_register_once_and_render_by_name() -> None:
    with pytest.raises(InvalidRequest) as info:
        engines.render(build(RenderRequest, audio=speechlike(0.2), avatar_preset="host"))
    assert info.value.field == "avatar_preset"
    avatars.register_preset("host", avatars.default_avatar_bytes())
    try:
        assert "host" in avatars.preset_names()
        video = engines.render(build(RenderRequest, audio=speechlike(0.4), avatar_preset="host", size=128))
        check_video(video, 0.4)
        with pytest.raises(InvalidRequest):
            avatars.register_preset("faceless", flat_grey())
        assert "faceless" not in avatars.preset_names()
    finally:
        avatars.unregister_preset("host")


def test_cancel_stops_the_render() -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(JobCancelled):
        engines.render(build(RenderRequest, audio=speechlike(1.0)), cancel=cancel)


async def test_local_provider_renders_and_rejects_faceless_avatars_at_submit() -> None:
    provider = LocalProvider()
    audio = speechlike(0.8)
    video = await provider.arender(audio)
    check_video(video, audio.duration_s)
    with pytest.raises(InvalidRequest) as info:
        await provider.submit(build(RenderRequest, audio=audio, avatar=flat_grey()))
    assert info.value.field == "avatar"


def test_cli_render_text_to_mp4(tmp_path: Path, piper_available: bool) -> None:
    out = tmp_path / "out.mp4"
    result = run_cli("render", "--text", "Hi there, how are you?", "-o", str(out), "--json", "--size", "256")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["fps"] == 25 and data["frames"] == frames_for(data["audio_seconds"], 25)
    assert data["provider"] == "local"
    got = decode(out.read_bytes())
    assert got["codecs"] == {"video": "h264", "audio": "aac"} and len(got["frames"]) == data["frames"]


def test_cli_render_rejects_bad_avatars(tmp_path: Path) -> None:
    wav = tmp_path / "in.wav"
    speechlike(0.5).save(wav)
    for name, data, words in (("junk.png", GARBAGE_PNG, "not an image"), ("grey.png", flat_grey(), "no face")):
        avatar = tmp_path / name
        avatar.write_bytes(data)
        out = tmp_path / "bad.mp4"
        result = run_cli("render", "--audio", str(wav), "--avatar", str(avatar), "-o", str(out))
        assert result.returncode == 2, result.stderr
        assert words in result.stderr and "Traceback" not in result.stderr
        assert not out.exists()


def test_worker_handle_renders_and_reports_bad_avatars_as_typed_errors() -> None:
    from broker import wire
    from broker.worker import handle

    audio = speechlike(0.6)
    ok = handle(wire.encode_request(build(RenderRequest, audio=audio, size=128)))
    video = wire.decode_result(ok)
    assert isinstance(video, Video)
    check_video(video, audio.duration_s)
    bad = handle(wire.encode_request(build(RenderRequest, audio=audio, avatar=flat_grey())))
    assert bad["ok"] is False and bad["error"]["field"] == "avatar"


def test_encoder_falls_back_to_libx264_when_nvenc_will_not_open(monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.engines import encode

    # claim NVENC is there: opening it for real fails on a machine without an NVIDIA GPU
    monkeypatch.setattr(encode, "_nvenc_ok", True)
    audio = speechlike(0.3)
    writer = encode.Mp4Writer(64, 64, 25, audio)
    grey = np.full((64, 64), 128, np.uint8), np.full((32, 32), 128, np.uint8)
    for _ in range(frames_for(audio.duration_s, 25)):
        writer.write(grey[0], grey[1], grey[1])
    data = writer.finish()
    assert writer.codec in ("libx264", "h264_nvenc")
    assert decode(data)["codecs"] == {"video": "h264", "audio": "aac"}
