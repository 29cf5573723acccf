"""What the store costs: manager overhead per job on SQLite vs PostgreSQL, and what 8 processes sustain.

    PYTHONPATH=. python scripts/bench_store.py [--jobs 2000] [--seconds 5] [--pg postgresql://postgres@127.0.0.1/test]

Overhead: a zero-latency fake provider called directly (``submit`` + ``result``) and through
``CloudGPUManager.arun``, interleaved job by job, with the ledger on a SQLite file or on PostgreSQL,
without a budget (the attempt is written once, behind) and with a daily budget (a reservation — the
locked check-and-insert — before every dispatch). Fleet: 8 processes on one PostgreSQL schema, each
with 50 jobs in flight against a daily budget, for ``--seconds``: jobs/s through the manager, and the
store alone (reserve + settle in a loop, no manager) — the store's ceiling on this machine.
Every PostgreSQL run uses a fresh schema, dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.routing.manager import CloudGPUManager
from broker.settings import Settings
from broker.store import StoreURL
from broker.testing.fake import FakeProvider, fake_catalog
from broker.types import SpeechRequest

TEXT = "a dozen words or so that a provider should speak in a few seconds"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def overhead(n: int, url: str, budget: bool) -> dict[str, float]:
    fake = FakeProvider("fake", usd_per_second=0.0001)
    s = Settings()
    s.ledger.url = url
    s.manager.fallback_local = False
    s.manager.daily_budget_usd = 1e9 if budget else None
    manager = CloudGPUManager([fake], settings=s, catalog=fake_catalog(fake))
    request = SpeechRequest(text=TEXT)

    async def direct_job() -> None:
        job = await fake.submit(request)
        await job.result()

    for _ in range(200):  # warm up: caches, prepared statements, the pool
        await manager.arun(request)
        await direct_job()
    direct, managed = [], []
    for _ in range(n):
        t = time.perf_counter()
        await direct_job()
        direct.append(time.perf_counter() - t)
        t = time.perf_counter()
        await manager.arun(request)
        managed.append(time.perf_counter() - t)
    rows = len(manager.ledger.attempts())
    assert rows == n + 200, rows
    manager.close()
    return {"p50": pct(managed, 0.5) - pct(direct, 0.5), "p99": pct(managed, 0.99) - pct(direct, 0.99),
            "managed_p50": pct(managed, 0.5), "direct_p50": pct(direct, 0.5)}


_FLEET = r"""
import asyncio, json, sys, time
sys.path.insert(0, sys.argv[3])
from broker.routing.manager import CloudGPUManager
from broker.settings import Settings
from broker.store import SpendLimit, open_store
from broker.testing.fake import FakeProvider, fake_catalog
from broker.types import SpeechRequest

url, mode = sys.argv[1], sys.argv[2]

def barrier():
    # say we are ready; the parent answers with the window once every process is ready
    print("ready", flush=True)
    return map(float, sys.stdin.readline().split())

async def through_manager():
    s = Settings()
    s.ledger.url = url
    s.manager.fallback_local = False
    s.manager.daily_budget_usd = 1e9
    fake = FakeProvider("fake", usd_per_second=0.0001)
    m = CloudGPUManager([fake], settings=s, catalog=fake_catalog(fake))
    await m.arun(SpeechRequest(text="warm up"))
    done = 0
    start_at, stop_at = barrier()
    async def lane():
        nonlocal done
        while time.time() < stop_at:
            await m.arun(SpeechRequest(text="a dozen words or so that a provider should speak"))
            done += 1
    await asyncio.sleep(max(0.0, start_at - time.time()))
    await asyncio.gather(*(lane() for _ in range(50)))
    m.close()
    return done

def store_only():
    ledger = open_store(url)
    daily = [SpendLimit("daily", 1e9, window_s=86400)]
    start_at, stop_at = barrier()
    time.sleep(max(0.0, start_at - time.time()))
    done = 0
    while time.time() < stop_at:
        aid, usd = ledger.open_attempt("j", "fake", reserved_usd=0.001, limits=daily)
        ledger.close_attempt(aid, "succeeded", cost_usd=0.0005)
        done += 1
    ledger.close()
    return done

n = asyncio.run(through_manager()) if mode == "manager" else store_only()
print(json.dumps({"jobs": n}))
"""


def fleet(url: str, mode: str, seconds: float, processes: int = 8) -> float:
    root = str(Path(__file__).resolve().parent.parent)
    procs = [subprocess.Popen([sys.executable, "-c", _FLEET, url, mode, root], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    start_at = time.time() + 0.5
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(f"{start_at} {start_at + seconds}\n")
        p.stdin.flush()
    total = 0
    for p in procs:
        out, _ = p.communicate(timeout=seconds + 120)
        total += json.loads(out.strip().splitlines()[-1])["jobs"]
    return total / seconds


def fresh_schema(admin_url: str) -> str:
    return f"{admin_url}{'&' if '?' in admin_url else '?'}schema=bench_store_{uuid.uuid4().hex[:10]}"


def drop(url: str) -> None:
    import psycopg

    parsed = StoreURL.parse(url)
    with psycopg.connect(parsed.dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{parsed.schema}" CASCADE')


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores, load {load}; Python {platform.python_version()}, no GPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    print(f"machine: {machine()}\n")
    print(f"manager overhead per job over a direct call ({args.jobs} sequential jobs, zero-latency fake)")
    print(f"{'ledger':<24} {'budget':<7} {'direct p50':>11} {'managed p50':>12} {'overhead p50':>13} "
          f"{'overhead p99':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        for label, budget in (("SQLite file", False), ("SQLite file", True), ("PostgreSQL", False),
                              ("PostgreSQL", True)):
            url = f"sqlite:///{tmp}/{uuid.uuid4().hex}.sqlite" if label.startswith("SQLite") else fresh_schema(args.pg)
            try:
                o = asyncio.run(overhead(args.jobs, url, budget))
            finally:
                if label == "PostgreSQL":
                    drop(url)
            print(f"{label:<24} {'daily' if budget else 'none':<7} {o['direct_p50'] * 1e3:>9.3f}ms "
                  f"{o['managed_p50'] * 1e3:>10.3f}ms {o['p50'] * 1e3:>11.3f}ms {o['p99'] * 1e3:>11.3f}ms")
    print(f"\n8 processes on one PostgreSQL schema, daily budget, {args.seconds:g} s")
    print(f"{'what runs':<44} {'jobs/s':>8}")
    for label, mode in (("manager.arun, 50 jobs in flight per process", "manager"),
                        ("store alone: reserve + settle, 1 per process", "store")):
        url = fresh_schema(args.pg)
        try:
            from broker.store import open_store

            open_store(url).close()  # migrate once, before the processes start together
            rate = fleet(url, mode, args.seconds)
        finally:
            drop(url)
        print(f"{label:<44} {rate:>8.0f}")


if __name__ == "__main__":
    main()
