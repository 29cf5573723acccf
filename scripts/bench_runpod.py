"""RunPod path on loopback: adapter + emulator round-trip overhead, and the real worker's cold start.

    PYTHONPATH=. python scripts/bench_runpod.py [--runs 10] [--cold-starts 3]

Overhead = wall time the caller sees minus the time the handler spent on the job (``metrics.run_s``
in the wire result). A "no-op" job is one the worker rejects at once (unknown speaker), so it is all
overhead; "Hi." adds a tiny synthesis. Cold start = worker process spawned -> its first job-take
(python + runpod import + broker import + Piper load).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from broker.errors import InvalidRequest
from broker.providers.runpod import RunPodProvider
from broker.testing.runpod_emulator import RunPodEmulator
from broker.types import SpeechRequest

IDLE_S = 1.2


async def back_to_back(emu: RunPodEmulator, runs: int) -> list[float]:
    """Queue delay when jobs arrive one right after another (the worker is not polling yet)."""
    rp = RunPodProvider(emu.endpoint_id, emu.api_key, base_url=emu.base_url, queue_timeout_s=None)
    delays = []
    for _ in range(runs):
        job = await rp.submit(SpeechRequest(text="Hi."))
        await job.result(timeout=60)
        delays.append((emu.job(job.id) or {}).get("delayTime", 0) / 1000)
    await rp.aclose()
    return delays


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def row(name: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"| {name:<44} | {statistics.median(ms):8.1f} | {pct(ms, 0.9):8.1f} | {min(ms):8.1f} | {len(ms):3d} |"


async def round_trips(emu: RunPodEmulator, runs: int, **provider_kw: Any) -> dict[str, list[float]]:
    rp = RunPodProvider(emu.endpoint_id, emu.api_key, base_url=emu.base_url, queue_timeout_s=None, **provider_kw)
    out: dict[str, list[float]] = {"noop": [], "tiny_wall": [], "tiny_overhead": [], "queue": [], "sdk": []}
    for _ in range(runs):
        # The SDK worker re-polls up to 1 s after a job ends (JobScaler.get_jobs sleeps 1 s while it is
        # busy); wait that out so each job meets an idle worker already waiting in its long-poll.
        await asyncio.sleep(IDLE_S)
        started = time.perf_counter()
        job = await rp.submit(SpeechRequest(text="Hi.", speaker=99))
        try:
            await job.result(timeout=60)
        except InvalidRequest:
            pass
        out["noop"].append(time.perf_counter() - started)

        await asyncio.sleep(IDLE_S)
        started = time.perf_counter()
        job = await rp.submit(SpeechRequest(text="Hi."))
        await job.result(timeout=60)
        wall = time.perf_counter() - started
        status = emu.job(job.id) or {}
        output = status.get("output")
        result = output[0] if isinstance(output, list) else output
        run_s = float(result["metrics"]["run_s"])
        out["tiny_wall"].append(wall)
        out["tiny_overhead"].append(wall - run_s)
        out["queue"].append(status.get("delayTime", 0) / 1000)
        out["sdk"].append(status.get("executionTime", 0) / 1000 - run_s)
    await rp.aclose()
    return out


def import_times(env: dict[str, str]) -> tuple[float, float]:
    code = (
        "import time; t=time.perf_counter(); import runpod; t1=time.perf_counter()\n"
        "from broker import engines; from broker.settings import Settings; s=Settings()\n"
        "engines.configure(s.engines, s.local.device); engines.preload(('piper',), render_engine=True)\n"
        "print(t1-t, time.perf_counter()-t1)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, **env})
    a, b = proc.stdout.split()
    return float(a), float(b)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--cold-starts", type=int, default=3)
    args = parser.parse_args()

    print("| measurement (loopback, real runpod SDK worker)  | median ms | p90 ms | min ms |   n |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, env in (("device=cpu", {"BROKER_LOCAL__DEVICE": "cpu"}), ("device=auto", {})):
        with RunPodEmulator(worker_env=env, long_poll_s=5) as emu:
            emu.wait_for_worker(timeout=300)
            for _ in range(args.cold_starts - 1):
                seen = len(emu.cold_starts)
                emu.crash_worker()  # the emulator starts a fresh worker process
                deadline = time.monotonic() + 300
                while len(emu.cold_starts) == seen and time.monotonic() < deadline:
                    time.sleep(0.1)
            print(row(f"worker cold start, spawn -> first take ({label})", [s for _, s in emu.cold_starts]))
            if label != "device=cpu":
                continue
            emu.wait_for_worker(timeout=300)
            polled = asyncio.run(round_trips(emu, args.runs))
            synced = asyncio.run(round_trips(emu, args.runs, use_runsync=True, runsync_max_s=30))
            print(row("no-op job round trip, /run + /status polling", polled["noop"]))
            print(row("no-op job round trip, /runsync", synced["noop"]))
            print(row("'Hi.' wall, /run + /status polling", polled["tiny_wall"]))
            print(row("'Hi.' overhead (wall - handler run_s), /run", polled["tiny_overhead"]))
            print(row("'Hi.' overhead (wall - handler run_s), /runsync", synced["tiny_overhead"]))
            print(row("  of which queue delay (delayTime)", polled["queue"]))
            print(row("  of which SDK + wire in the worker", polled["sdk"]))
            print(row("queue delay, jobs back to back (SDK re-poll)", asyncio.run(back_to_back(emu, args.runs))))
        runpod_s, broker_s = import_times(env)
        print(row(f"  import runpod ({label})", [runpod_s]))
        print(row(f"  import broker + load Piper ({label})", [broker_s]))


if __name__ == "__main__":
    main()
