"""Benchmark the local engines: Piper speed, time to first audio, render frames per second.

    PYTHONPATH=. python scripts/bench_engines.py [--repeats 3] [--seconds 10]

Prints the machine and a Markdown table (paste it into docs/PERFORMANCE.md). Every
number is measured with warm engines (models loaded, one throw-away run first), as a
long-running worker sees them; the cold render row adds a new avatar's face detection
and warp table. Runs on CUDA too when torch sees a GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import cv2
import numpy as np

from broker import engines
from broker.engines import avatars
from broker.engines.encode import nvenc_available
from broker.engines.renderer import warm_up
from broker.media import Audio
from broker.types import RenderRequest, SpeechRequest

PARAGRAPH = (
    "The lighthouse keeper climbed the spiral stairs an hour before dusk, as he had every evening for "
    "thirty years. Outside, the wind had turned, and the sea was beginning to heave against the rocks below. "
    "He trimmed the wick, polished the great lens until it shone, and checked the oil twice, because a ship "
    "he could not see might be counting on him tonight. When the light finally swept across the water, he "
    "sat down by the window with a cup of tea and listened to the storm arrive."
)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def cpu_timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """Wall seconds, CPU seconds of this process (all threads), result. CPU time is what a busy,
    shared machine inflates less than wall time (thread pools that spin while waiting still count)."""
    cpu = time.process_time()
    wall, out = timed(fn)
    return wall, time.process_time() - cpu, out


def load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def summary(values: list[float], fmt: str, *, higher_is_better: bool = False) -> str:
    best = max(values) if higher_is_better else min(values)
    return f"{fmt.format(best)} / {fmt.format(statistics.median(values))}"


def bench_speech(repeats: int) -> list[tuple[str, str, str]]:
    request = SpeechRequest(text=PARAGRAPH)
    engines.synthesize(SpeechRequest(text="Warming up."))
    rtfs, cpu_rtfs = [], []
    seconds = 0.0
    for _ in range(repeats):
        wall, cpu, audio = cpu_timed(lambda: engines.synthesize(request))
        assert isinstance(audio, Audio)
        seconds = audio.duration_s
        rtfs.append(wall / seconds)
        cpu_rtfs.append(cpu / seconds)
    firsts = []
    for _ in range(max(repeats, 5)):
        start = time.perf_counter()
        stream = engines.synthesize_stream(request)
        next(iter(stream))
        firsts.append((time.perf_counter() - start) * 1000)
        for _piece in stream:  # drain so the next run starts clean
            pass
    words = len(PARAGRAPH.split())
    return [
        (f"Piper real-time factor ({words} words, {seconds:.1f} s of audio)", summary(rtfs, "{:.3f}"), "≤ 0.1"),
        ("Piper CPU-seconds per audio second (same runs; less load-sensitive)", summary(cpu_rtfs, "{:.3f}"), "—"),
        ("Piper time to first audio chunk (same paragraph, streamed)", summary(firsts, "{:.0f} ms"), "≤ 300 ms"),
    ]


def bench_render(repeats: int, seconds: float, device: str) -> list[tuple[str, str, str]]:
    engines.configure(None, device)
    warm_up()
    # real speech with phoneme timings, cut to the requested length
    audio = engines.synthesize(SpeechRequest(text=PARAGRAPH * 2, max_length_ms=seconds * 1000))
    request = RenderRequest(audio=audio, size=512, fps=25)
    engines.render(request)  # throw-away run
    fps, cpu_ms = [], []
    frames = 0
    for _ in range(repeats):
        wall, cpu, video = cpu_timed(lambda: engines.render(request))
        frames = video.frames  # type: ignore[attr-defined]
        fps.append(frames / wall)
        cpu_ms.append(cpu / frames * 1000)
    # a portrait never seen before: face detection, framing and the warp table are part of the run
    image = cv2.imdecode(np.frombuffer(avatars.default_avatar_bytes(), np.uint8), cv2.IMREAD_COLOR)
    cold = []
    for i in range(repeats):
        shifted = np.ascontiguousarray(np.roll(cv2.flip(image, 1), i + 1, axis=1))
        ok, data = cv2.imencode(".png", shifted)
        assert ok
        fresh = RenderRequest(audio=audio, avatar=data.tobytes(), size=512, fps=25)
        wall, video = timed(lambda r=fresh: engines.render(r))  # type: ignore[misc]
        cold.append(video.frames / wall)  # type: ignore[attr-defined]
    codec = "h264_nvenc" if device == "cuda" and nvenc_available() else "libx264"
    label = f"{device}, {codec}"
    warm_fps = summary(fps, "{:.0f}", higher_is_better=True)
    cold_fps = summary(cold, "{:.0f}", higher_is_better=True)
    return [
        (f"Render fps, 512×512, {frames} frames incl. encoding ({label})", warm_fps, "≥ 25"),
        ("Render CPU-ms per frame (same runs; less load-sensitive)", summary(cpu_ms, "{:.1f}"), "—"),
        (f"Render fps, same, new avatar each run ({label})", cold_fps, "≥ 25"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="audio length for the render rows")
    args = parser.parse_args()

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}; "
          f"GPU: {gpu or 'none'}; default device: {engines.device()}")
    started_load = load()
    rows = bench_speech(args.repeats)
    rows += bench_render(args.repeats, args.seconds, "cpu")
    if gpu:
        rows += bench_render(args.repeats, args.seconds, "cuda")
    else:
        rows.append(("Render on CUDA", "not measured (no GPU)", "—"))
    print(f"1-minute load average: {started_load} at start, {load()} at end (other work on the machine)")
    print()
    print(f"| measure | best / median of {args.repeats} | target |")
    print("| --- | --- | --- |")
    for name, value, target in rows:
        print(f"| {name} | {value} | {target} |")


if __name__ == "__main__":
    main()
