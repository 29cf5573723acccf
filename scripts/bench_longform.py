"""Long work over 1, 4, 16, 64 workers: wall time, speedup, $ and time to first audio (docs/PERFORMANCE.md).

    python scripts/bench_longform.py                 # simulated workers, virtual clock (seconds)
    python scripts/bench_longform.py --json          # the same rows as JSON
    python scripts/bench_longform.py --rss           # peak RSS for 1,000 / 10,000 / 50,000 words
    python scripts/bench_longform.py --emulator      # a real run: RunPod emulator, 1 vs 3 SDK workers

The simulated rows run the real scheduler, manager, ledger, journal and stitcher against fake endpoints
with a latency model (broker.testing.fake: per-worker cold start, compute = RTF x audio, N workers) on a
virtual clock (broker.testing.clock: the loop's time jumps to the next timer when idle; work in threads
stops the clock), so times are model seconds whatever the machine's load; --scale runs a sped-up real
clock instead, which shows this box's own overhead. The fakes are named and priced as the
packaged catalog's RunPod rows, and their RTFs are the packaged profiles' (CSM on A100, Piper on a 2-vCPU
CPU worker). They return a short placeholder clip per piece (validation off) so that this 2-core box's
encoding work does not leak into the model clock; --rss and --emulator measure real audio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile  # noqa: F401  # imported up front: a first-use import is not scheduling time

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORKERS = (1, 4, 16, 64)
MACHINE = f"{os.cpu_count()}-core shared CPU, no GPU"


def book_text(words: int) -> str:
    sentences = [f"Sentence {i} of the book carries the story a little further on." for i in range(words // 11)]
    per = max(1, len(sentences) // 10)
    chapters = [" ".join(sentences[i:i + per]) for i in range(0, len(sentences), per)]
    return "\n\n".join(f"Chapter {n + 1}\n\n{body}" for n, body in enumerate(chapters))


def placeholder(request: Any, behaviour: str) -> Any:
    from broker.media import Audio

    return Audio(np.full(240, 0.1, dtype=np.float32))


async def one_row(scenario: dict[str, Any], workers: int, scale: float, text: str) -> dict[str, Any]:
    from broker.longform import LongJob, as_chapters
    from broker.media import Audio
    from broker.money.pricing import Catalog
    from broker.routing.manager import CloudGPUManager
    from broker.settings import Settings
    from broker.testing.fake import FakeProvider
    from broker.types import Segment

    catalog = Catalog.packaged()
    row = catalog.price("runpod", scenario["hardware"])
    assert row is not None
    prof = catalog.profile(scenario["engine"], row.profile)
    assert prof is not None
    fake = FakeProvider("runpod", hardware=scenario["hardware"], rtf=prof.value, cold_start_s=row.cold_start_s,
                        usd_per_second=row.usd_per_second, max_concurrency=workers, time_scale=scale or 1.0,
                        make=placeholder)
    settings = Settings()
    with tempfile.TemporaryDirectory() as tmp:
        settings.ledger.path = str(Path(tmp) / "ledger.sqlite")
        settings.manager.fallback_local = False
        settings.manager.validate_output = False
        settings.manager.default_deadline_s = 10**7  # model seconds would otherwise trip the deadline
        manager = CloudGPUManager([fake], settings=settings, catalog=catalog)
        context = [Segment(speaker=0, text="Reference.", audio=Audio(np.full(2400, 0.1, np.float32)))] \
            if scenario.get("context") else []
        job = LongJob(manager, as_chapters(text), engine=scenario["engine"], context=context, workers=workers)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        result = await job.run()
        wall = (loop.time() - t0) / (scale or 1.0)
        job.close()
        manager.close()
    audio_s = sum(p.words for p in job.pieces) * 0.4 * 0.9  # what the fakes' model made
    one_job_s = row.cold_start_s + prof.value * audio_s  # the whole book as one job on one worker
    one_job_usd = one_job_s * row.usd_per_second
    cold_usd = row.cold_start_s * row.usd_per_second
    piece_run_s = prof.value * audio_s / len(job.pieces)
    return {
        "scenario": scenario["name"], "workers": workers, "pieces": result.pieces,
        "wall_s": round(wall, 1), "one_job_s": round(one_job_s, 1), "speedup": round(one_job_s / wall, 2),
        "usd": round(result.cost_usd, 4), "one_job_usd": round(one_job_usd, 4),
        "cost_ratio": round(result.cost_usd / one_job_usd, 3),
        "cost_vs_target": round(result.cost_usd / (one_job_usd + (fake.workers_started - 1) * cold_usd), 3),
        "workers_started": fake.workers_started,
        "first_audio_s": round((result.first_audio_s or 0.0) / (scale or 1.0), 1),
        "first_audio_target_s": round(piece_run_s + row.cold_start_s, 1),
    }


async def render_row(workers: int, minutes: float) -> dict[str, Any]:
    """A long render's segments over N workers (the join, a local re-encode, is not in the model)."""
    from broker.longform.render import SEGMENT_S, render_segments
    from broker.media import SAMPLE_RATE, Audio
    from broker.money.pricing import Catalog
    from broker.routing.manager import CloudGPUManager
    from broker.settings import Settings
    from broker.testing.fake import FakeProvider

    catalog = Catalog.packaged()
    row = catalog.price("runpod", "A100-80GB")
    prof = catalog.profile("render", "gpu")
    assert row is not None and prof is not None
    rtf = 25.0 / prof.value  # compute seconds per audio second at 25 fps
    fake = FakeProvider("runpod", hardware="A100-80GB", rtf=rtf, cold_start_s=row.cold_start_s,
                        usd_per_second=row.usd_per_second, max_concurrency=workers)
    settings = Settings()
    settings.ledger.path = ":memory:"
    settings.manager.fallback_local = False
    settings.manager.default_deadline_s = 10**7
    manager = CloudGPUManager([fake], settings=settings, catalog=catalog)
    t = np.arange(int(minutes * 60 * SAMPLE_RATE), dtype=np.float32) / SAMPLE_RATE
    audio = Audio((0.3 * np.sin(2 * np.pi * 200 * t) * ((t % 4) < 3.2)).astype(np.float32))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    videos = await render_segments(manager, audio, workers=workers)
    wall = loop.time() - t0
    cost = sum(v.report.cost_usd for v in videos if v.report)
    one_job_s = row.cold_start_s + rtf * audio.duration_s
    one_usd = one_job_s * row.usd_per_second
    cold_usd = row.cold_start_s * row.usd_per_second
    return {"scenario": f"render {minutes:g} min, A100", "workers": workers, "pieces": len(videos),
            "wall_s": round(wall, 1), "one_job_s": round(one_job_s, 1), "speedup": round(one_job_s / wall, 2),
            "usd": round(cost, 4), "one_job_usd": round(one_usd, 4), "cost_ratio": round(cost / one_usd, 3),
            "cost_vs_target": round(cost / (one_usd + (fake.workers_started - 1) * cold_usd), 3),
            "workers_started": fake.workers_started, "first_audio_s": 0.0,
            "first_audio_target_s": round(rtf * SEGMENT_S + row.cold_start_s, 1)}


SCENARIOS = [
    {"name": "CSM on A100, caller's context", "engine": "csm", "hardware": "A100-80GB", "context": True},
    {"name": "CSM on A100, first-piece anchor", "engine": "csm", "hardware": "A100-80GB", "context": False},
    {"name": "Piper on 2-vCPU CPU workers", "engine": "piper", "hardware": "cpu"},
]


def simulated(words: int, scale: float, as_json: bool) -> None:
    from broker.testing.clock import run_virtual

    text = book_text(words)
    rows = []
    for sc in SCENARIOS:
        for n in WORKERS:
            coro = one_row(sc, n, scale, text)
            rows.append(run_virtual(coro) if not scale else asyncio.run(coro))
            if not as_json:
                print(_fmt(rows[-1]), flush=True)
    for n in WORKERS:
        rows.append(run_virtual(render_row(n, 10.0)))
        if not as_json:
            print(_fmt(rows[-1]), flush=True)
    if as_json:
        print(json.dumps({"machine": MACHINE, "words": words, "scale": scale, "rows": rows}, indent=2))


def _fmt(r: dict[str, Any]) -> str:
    return (f"{r['scenario']:<34} {r['workers']:>3} workers  {r['pieces']:>4} pieces  wall {r['wall_s']:>7.1f} s  "
            f"speedup {r['speedup']:>5.2f}  ${r['usd']:.4f} (x{r['cost_ratio']:.2f} of one job, "
            f"x{r['cost_vs_target']:.2f} of one job + extra cold starts)  first audio {r['first_audio_s']:.1f} s "
            f"(target < {r['first_audio_target_s']:.1f})")


RSS_SCRIPT = """
import resource, sys, json, time
from pathlib import Path
sys.path.insert(0, {root!r})
from broker.routing.manager import CloudGPUManager
from broker.settings import Settings
sys.path.insert(0, {scripts!r})
from bench_longform import book_text
s = Settings(); s.ledger.path = sys.argv[2]
kind = sys.argv[3]
if kind == "local":
    m = CloudGPUManager(["local"], settings=s)
else:
    import numpy as np
    from broker.media import Audio
    from broker.testing.fake import FakeProvider, fake_catalog
    def fresh(request, behaviour):  # a new buffer per piece (the fake's tone cache would hide growth)
        n = int(24000 * 0.36 * len(request.text.split()))
        return Audio((0.2 * np.sin(np.arange(n, dtype=np.float32) * 0.05)).astype(np.float32))
    s.manager.fallback_local = False
    f = FakeProvider("fake", max_concurrency=4, make=fresh, keep_jobs=False)
    m = CloudGPUManager([f], settings=s, catalog=fake_catalog(f))
t0 = time.monotonic()
r = m.speak_long(book_text(int(sys.argv[1])), output=Path(sys.argv[4]))
print(json.dumps({{"words": int(sys.argv[1]), "provider": kind, "audio_min": round(r.audio_seconds / 60, 1),
    "wall_s": round(time.monotonic() - t0, 1), "pieces": r.pieces,
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}}))
"""


def rss(sizes: list[tuple[int, str]], as_json: bool) -> None:
    script = RSS_SCRIPT.format(root=str(ROOT), scripts=str(ROOT / "scripts"))
    rows = []
    for words, kind in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run([sys.executable, "-c", script, str(words), f"{tmp}/l.sqlite", kind, f"{tmp}/b.wav"],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{words} words {kind}: failed\n{out.stderr[-2000:]}", file=sys.stderr, flush=True)
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            if not as_json:
                r = rows[-1]
                print(f"{r['words']:>6} words  {r['provider']:<5} {r['pieces']:>4} pieces  "
                      f"{r['audio_min']:>6.1f} audio min  {r['wall_s']:>6.1f} s  peak RSS {r['peak_rss_mb']} MB",
                      flush=True)
    if as_json:
        print(json.dumps({"machine": MACHINE, "rows": rows}, indent=2))


def emulator(words: int, as_json: bool) -> None:
    from broker.longform import as_chapters, aspeak_long
    from broker.providers.runpod import RunPodProvider
    from broker.routing.manager import CloudGPUManager
    from broker.settings import Settings
    from broker.testing.runpod_emulator import RunPodEmulator

    rows = []
    for n in (1, 3):
        with RunPodEmulator(worker_env={"BROKER_LOCAL__DEVICE": "cpu"}, long_poll_s=5, workers_max=n) as emu:
            deadline = time.monotonic() + 300
            while len(emu.cold_starts) < n and time.monotonic() < deadline:
                time.sleep(0.2)
            with tempfile.TemporaryDirectory() as tmp:
                s = Settings()
                s.ledger.path = f"{tmp}/l.sqlite"
                s.manager.fallback_local = False
                s.runpod.workers_max = n
                rp = RunPodProvider(emu.endpoint_id, emu.api_key, base_url=emu.base_url, queue_timeout_s=300.0)
                m = CloudGPUManager([rp], settings=s)
                t0 = time.monotonic()
                r = asyncio.run(aspeak_long(m, as_chapters(book_text(words)), output=f"{tmp}/b.wav", target_run_s=2.0))
                wall = time.monotonic() - t0
                m.close()
        rows.append({"workers": n, "pieces": r.pieces, "wall_s": round(wall, 1),
                     "audio_min": round(r.audio_seconds / 60, 2), "first_audio_s": round(r.first_audio_s or 0, 1)})
        if not as_json:
            print(f"RunPod emulator, {n} real SDK worker(s), {words} words: {r.pieces} pieces, {wall:.1f} s wall, "
                  f"first audio {r.first_audio_s:.1f} s (CPU-bound: {MACHINE})", flush=True)
    if as_json:
        print(json.dumps({"machine": MACHINE + " (CPU-bound)", "words": words, "rows": rows}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--words", type=int, default=10_000)
    ap.add_argument("--scale", type=float, default=0.0,
                    help="run on a real clock sped up this much (e.g. 0.005) instead of the virtual clock")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rss", action="store_true", help="peak RSS of whole runs, fake and local Piper")
    ap.add_argument("--local-words", type=int, nargs="*", default=[1_000, 5_000],
                    help="book sizes for the local-Piper RSS rows")
    ap.add_argument("--emulator", action="store_true", help="real run: RunPod emulator, 1 vs 3 workers")
    args = ap.parse_args()
    if not args.json:
        print(f"machine: {MACHINE}")
    if args.rss:
        rss([(w, "fake") for w in (1_000, 10_000, 50_000)] + [(w, "local") for w in args.local_words], args.json)
    elif args.emulator:
        emulator(min(args.words, 600), args.json)
    else:
        simulated(args.words, args.scale, args.json)


if __name__ == "__main__":
    main()
