"""What the Replicate path adds to a job, on loopback: the Cog runtime and the hosted-API emulator.

    PYTHONPATH=. python scripts/bench_replicate_loopback.py [--runs 5]

Prints one table: the Cog runtime's cold start (process start to READY, Piper loaded in
``setup``), then the median wall time of one short speech job run four ways: in process
(``broker.worker.handle``), on the Cog runtime directly, through the adapter and the
emulator (``Prefer: wait``, the output downloaded), and streamed (time to the first chunk).
The differences are the cost of HTTP, JSON/base64, webhooks and downloads, not of any GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable

import httpx

from broker import engines, wire
from broker.providers.replicate import ReplicateProvider
from broker.testing.cog_runtime import CogRuntime
from broker.testing.replicate_emulator import EmulatorServer, ReplicateEmulator
from broker.types import SpeechRequest, build
from broker.worker import handle

TEXT = ("The quick brown fox jumps over the lazy dog. It was not amused, and it said so. "
        "The dog, for its part, slept on. A bird watched from the fence. Then the sun went down.")
TOKEN = "r8_bench"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    request = build(SpeechRequest, text=TEXT)
    job = wire.encode_request(request)
    engines.preload(render_engine=False)

    started = time.perf_counter()
    with CogRuntime() as runtime:
        cold_start = time.perf_counter() - started
        with EmulatorServer(ReplicateEmulator(runtime.url, token=TOKEN)) as server:
            provider = ReplicateProvider(api_token=TOKEN, model="broker/broker", base_url=f"{server.url}/v1",
                                         wait_s=60)
            samples = asyncio.run(_measure(provider, runtime.url, request, job, runs))

    print(f"{'path':44} {'seconds':>8}")
    print(f"{'Cog runtime cold start (to READY)':44} {cold_start:8.3f}")
    for name, values in samples.items():
        print(f"{name:44} {statistics.median(values):8.3f}")
    print(f"(median of {runs} interleaved runs after one warm-up; {len(TEXT.split())} words of speech)")


async def _measure(provider: ReplicateProvider, cog_url: str, request: SpeechRequest, job: dict[str, object],
                   runs: int) -> dict[str, list[float]]:
    async def in_process() -> None:
        assert (await asyncio.to_thread(handle, job))["ok"]

    async def cog_direct() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            resp = await client.post(f"{cog_url}/predictions", json={"input": {"job": json.dumps(job)}})
        assert resp.json()["status"] == "succeeded"

    async def adapter() -> None:
        await provider.arun(request, timeout=120)

    first: list[float] = []

    async def streamed() -> None:
        started = time.perf_counter()
        stream = provider.astream_speech(TEXT)
        await anext(stream)
        first.append(time.perf_counter() - started)
        async for _ in stream:
            pass

    paths: dict[str, Callable[[], Awaitable[None]]] = {
        "in process: broker.worker.handle": in_process,
        "Cog runtime, sync POST /predictions": cog_direct,
        "adapter → emulator → Cog (Prefer: wait)": adapter,
        "adapter, streamed: whole job": streamed,
    }
    samples: dict[str, list[float]] = {name: [] for name in paths}
    # Interleaved, so a busy neighbour slows every path alike; run 0 warms each path up.
    for run in range(runs + 1):
        for name, fn in paths.items():
            started = time.perf_counter()
            await fn()
            if run:
                samples[name].append(time.perf_counter() - started)
    samples["adapter, streamed: first chunk"] = first[1:]
    await provider.aclose()
    return samples


if __name__ == "__main__":
    main()
