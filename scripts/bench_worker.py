"""Round-trip overhead of the self-hosted worker: the same tiny speech job in-process and over loopback HTTP.

    PYTHONPATH=. python scripts/bench_worker.py [--runs 30] [--text "Hi."]

Rows:
  handle (in-process)        broker.worker.handle(payload): the engine plus wire encoding, no HTTP
  POST /run (raw httpx)      + HTTP on loopback, auth, body limit, job thread
  HTTPProvider               + building the payload and decoding the result (what a caller sees)
  HTTPProvider via proxy     + the Modal proxy stand-in in front (the Modal HTTP path's shape)
  LocalProvider              the in-process provider, for comparison
Each call is timed end to end and paired with the engine time the worker reports for that same call
(``metrics.run_s``); overhead = wall - run_s, so the engine's own noise (large on a shared CPU)
cancels out. The medians of wall, run_s and overhead are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
from pydantic import SecretStr

from broker import engines, wire
from broker.providers.base import Provider
from broker.providers.http import HTTPProvider
from broker.providers.local import LocalProvider
from broker.providers.modal import ModalProvider
from broker.testing.asgi_server import LoopbackServer
from broker.testing.modal_web import ModalWebProxy
from broker.types import SpeechRequest, build
from broker.worker import handle
from broker.worker.server import create_app

KEY = "bench-key"


Sample = tuple[float, float]  # (wall seconds, engine seconds reported by the worker)


async def timed(fn: Callable[[], Awaitable[float]], runs: int) -> list[Sample]:
    await fn()  # warm: connection pools, first-call imports
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        run_s = await fn()
        out.append((time.perf_counter() - started, run_s))
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--text", default="Hi.")
    args = parser.parse_args()

    engines.preload(("piper",))
    payload = wire.encode_request(build(SpeechRequest, text=args.text))
    request = build(SpeechRequest, text=args.text)
    rows: dict[str, list[Sample]] = {}

    async def in_process() -> float:
        result = await asyncio.to_thread(handle, payload)
        return float(result["metrics"]["run_s"])

    rows["handle (in-process)"] = await timed(in_process, args.runs)

    with LoopbackServer(create_app(api_key=KEY)) as worker:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}) as client:
            async def raw() -> float:
                r = await client.post(f"{worker.url}/run", json=payload)
                r.raise_for_status()
                return float(r.json()["metrics"]["run_s"])

            rows["POST /run (raw httpx)"] = await timed(raw, args.runs)

        async with HTTPProvider(worker.url, api_key=KEY) as provider:
            rows["HTTPProvider"] = await timed(lambda: provider_run(provider, request), args.runs)

    front = ModalWebProxy(create_app(preload=None), token_id="wk-bench", token_secret="ws-bench")
    with LoopbackServer(front) as proxied:
        async with ModalProvider(url=proxied.url, proxy_key=SecretStr("wk-bench"),
                                 proxy_secret=SecretStr("ws-bench")) as modal:
            rows["HTTPProvider via proxy"] = await timed(lambda: provider_run(modal, request), args.runs)

    local = LocalProvider()
    rows["LocalProvider"] = await timed(lambda: provider_run(local, request), args.runs)

    print(f"# {args.runs} runs of {args.text!r} · {platform.machine()} · python {platform.python_version()} · "
          f"engine device {engines.device()}")
    print(f"| {'path':<24} | wall ms (median) | engine ms (median) | overhead ms (median) | overhead ms (p90) |")
    print(f"|{'-' * 26}|------------------|--------------------|----------------------|-------------------|")
    for name, samples in rows.items():
        wall = statistics.median(w for w, _ in samples)
        run = statistics.median(r for _, r in samples)
        over = [w - r for w, r in samples]
        p90 = statistics.quantiles(over, n=10)[-1]
        print(f"| {name:<24} | {wall * 1000:16.1f} | {run * 1000:18.1f} | {statistics.median(over) * 1000:20.1f} "
              f"| {p90 * 1000:17.1f} |")


async def provider_run(provider: Provider, request: SpeechRequest) -> float:
    job = await provider.submit(request)
    await job.result()
    assert job.billing is not None
    return float(job.billing.run_seconds or 0.0)


if __name__ == "__main__":
    asyncio.run(main())
