"""What the manager costs: per-job overhead over calling a provider directly, and 1,000 jobs in flight.

    PYTHONPATH=. python scripts/bench_manager.py [--jobs 5000] [--in-flight 1000]

Overhead: the same zero-latency scripted fake provider is called directly (``submit`` + ``result``)
and through ``CloudGPUManager.arun`` (rank, quote, reserve, dispatch, validate, ledger, report),
interleaved so both see the same machine load; the table shows p50/p99 of each and the difference.
In flight: ``--in-flight`` jobs are submitted to a fake that takes 2 s each, so all are in flight at
once; the table shows the memory they hold (RSS growth, and the Python heap by tracemalloc in a
second pass) and the CPU time spent to route them. Both include the fake provider's own jobs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.providers.base import JobState
from broker.routing.manager import CloudGPUManager
from broker.settings import Settings
from broker.testing.fake import FakeProvider, fake_catalog
from broker.types import SpeechRequest

TEXT = "a dozen words or so that a provider should speak in a few seconds"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def make_manager(ledger_path: str, budget: bool, provider: FakeProvider) -> CloudGPUManager:
    s = Settings()
    s.ledger.path = ledger_path
    s.manager.fallback_local = False
    if budget:
        s.manager.daily_budget_usd = 1e9
    return CloudGPUManager([provider], settings=s, catalog=fake_catalog(provider))


async def overhead(n: int, ledger_path: str, budget: bool) -> dict[str, float]:
    fake = FakeProvider("fake", usd_per_second=0.0001)
    manager = make_manager(ledger_path, budget, fake)
    request = SpeechRequest(text=TEXT)

    async def direct_job() -> None:
        job = await fake.submit(request)
        await job.result()

    async def managed_job() -> None:
        await manager.arun(request)

    for _ in range(300):  # warm up caches, the tone table, SQLite pages
        await managed_job()
        await direct_job()
    # Wall time, interleaved job by job so both see the same machine load.
    direct, managed = [], []
    for _ in range(n):
        t = time.perf_counter()
        await direct_job()
        direct.append(time.perf_counter() - t)
        t = time.perf_counter()
        await managed_job()
        managed.append(time.perf_counter() - t)
    # CPU time of this process per job, in batches: other processes' load does not count here.
    cpu = {}
    for name, fn in (("direct", direct_job), ("managed", managed_job)):
        t = time.process_time()
        for _ in range(n):
            await fn()
        cpu[name] = (time.process_time() - t) / n
    manager.ledger.flush()
    rows = len(manager.ledger.attempts())
    assert rows == 2 * n + 300, rows
    manager.ledger.close()
    return {
        "direct_p50": pct(direct, 0.5), "direct_p99": pct(direct, 0.99),
        "managed_p50": pct(managed, 0.5), "managed_p99": pct(managed, 0.99),
        "overhead_p50": pct(managed, 0.5) - pct(direct, 0.5),
        "overhead_p99": pct(managed, 0.99) - pct(direct, 0.99),
        "overhead_cpu": cpu["managed"] - cpu["direct"],
    }


async def in_flight(n: int, ledger_path: str, trace: bool = False) -> dict[str, float]:
    fake = FakeProvider("fake", latency_s=2.0, usd_per_second=0.0001)
    manager = make_manager(ledger_path, False, fake)
    request = SpeechRequest(text=TEXT)
    await manager.arun(SpeechRequest(text="warm up"), deadline_s=10)
    gc.collect()
    if trace:
        tracemalloc.start()
    base_rss = rss_mb()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    jobs = [await manager.submit(request) for _ in range(n)]
    await asyncio.sleep(1.0)  # every job is dispatched and waiting on the provider
    running = sum(1 for j in jobs if j.state == JobState.RUNNING)
    held_rss = rss_mb() - base_rss
    held_py = tracemalloc.get_traced_memory()[0] / 2**20 if trace else float("nan")
    cpu_dispatch = time.process_time() - cpu0
    results = await asyncio.gather(*(j.result() for j in jobs))
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    if trace:
        tracemalloc.stop()
    assert all(r.report is not None for r in results)
    manager.ledger.close()
    return {"jobs": n, "running": running, "rss_mb": held_rss, "py_mb": held_py, "cpu_s": cpu,
            "cpu_dispatch_s": cpu_dispatch, "wall_s": wall}


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores, load {load}; Python {platform.python_version()}, {platform.system()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--in-flight", type=int, default=1000)
    args = parser.parse_args()
    print(f"machine: {machine()}\n")
    with tempfile.TemporaryDirectory() as tmp:
        file_ledger = str(Path(tmp) / "ledger.sqlite")
        # In flight first, in a fresh process, so RSS growth is not hidden by memory freed earlier.
        r = asyncio.run(in_flight(args.in_flight, file_ledger + ".f"))
        py = asyncio.run(in_flight(args.in_flight, file_ledger + ".t", trace=True))["py_mb"]
        print(f"{r['jobs']} jobs in flight at once (fake provider, 2 s each, file ledger)")
        print(f"{'running at once':<16} {'RSS growth':>11} {'per job':>9} {'Python heap':>12} {'per job':>9} "
              f"{'CPU to dispatch':>16} {'CPU total':>10} {'wall':>7}")
        print(f"{r['running']:<16} {r['rss_mb']:>9.1f}MB {r['rss_mb'] * 1024 / r['jobs']:>7.1f}KB "
              f"{py:>10.1f}MB {py * 1024 / r['jobs']:>7.1f}KB "
              f"{r['cpu_dispatch_s']:>15.2f}s {r['cpu_s']:>9.2f}s {r['wall_s']:>6.2f}s\n")
        cases = [("in-memory ledger", ":memory:", False), ("SQLite file ledger (default)", file_ledger, False),
                 ("file ledger + daily budget", file_ledger + ".b", True)]
        print(f"per-job overhead over a direct call, {args.jobs} sequential jobs, zero-latency fake provider")
        print(f"{'case':<30} {'direct p50':>11} {'direct p99':>11} {'managed p50':>12} {'managed p99':>12} "
              f"{'overhead p50':>13} {'overhead p99':>13} {'overhead CPU/job':>17}")
        for label, path, budget in cases:
            o = asyncio.run(overhead(args.jobs, path, budget))
            print(f"{label:<30} {o['direct_p50'] * 1e3:>9.3f}ms {o['direct_p99'] * 1e3:>9.3f}ms "
                  f"{o['managed_p50'] * 1e3:>10.3f}ms {o['managed_p99'] * 1e3:>10.3f}ms "
                  f"{o['overhead_p50'] * 1e3:>11.3f}ms {o['overhead_p99'] * 1e3:>11.3f}ms "
                  f"{o['overhead_cpu'] * 1e3:>15.3f}ms")


if __name__ == "__main__":
    main()
