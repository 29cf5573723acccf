"""What `broker serve` adds over the Python API, and how many jobs it accepts.

    python scripts/bench_gateway.py [--jobs 300] [--json]

Rows: added latency per job over ``manager.arun`` (p50/p99; a zero-latency fake provider, so the numbers are
the gateway's own cost: HTTP, the job table, the queue, the output file), jobs/s accepted by one replica
(SQLite, in-process queue; PostgreSQL, procrastinate) and by two replicas on one PostgreSQL, and the memory a
replica holds per 1,000 queued jobs. Needs PostgreSQL at 127.0.0.1:5432 for the PostgreSQL rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from broker.testing.asgi_server import LoopbackServer  # noqa: E402
from broker.testing.fake import FakeProvider  # noqa: E402
from broker.types import SpeechRequest  # noqa: E402
from tests.gateway_support import fake_manager, gateway_app  # noqa: E402
from tests.pg import pg_database  # noqa: E402
from tests.test_gateway_replicas import start_replica  # noqa: E402

BODY = {"kind": "speech", "input": {"text": "A short sentence for the benchmark."}}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def latency_rows(n: int) -> list[dict[str, object]]:
    tmp = Path(tempfile.mkdtemp())
    manager = fake_manager(tmp, FakeProvider("fast", usd_per_second=0.001))

    async def direct() -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            await manager.arun(SpeechRequest(text=BODY["input"]["text"]))
            out.append(time.perf_counter() - t0)
        return out

    base = asyncio.run(direct())
    manager = fake_manager(tmp / "gw", FakeProvider("fast", usd_per_second=0.001))
    via: list[float] = []
    with LoopbackServer(gateway_app(tmp / "gw", manager)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            job = c.post("/v1/jobs", json=BODY).json()
            view = c.get(f"/v1/jobs/{job['id']}", params={"wait": 30}).json()
            assert view["state"] == "succeeded", view
            c.get(f"/v1/jobs/{job['id']}/output").read()
            via.append(time.perf_counter() - t0)
    return [{"row": "added latency per job (submit, wait, download)",
             "p50_ms": round(1000 * (pct(via, .5) - pct(base, .5)), 2),
             "p99_ms": round(1000 * (pct(via, .99) - pct(base, .99)), 2),
             "python_api_p50_ms": round(1000 * pct(base, .5), 3)}]


async def accept(urls: list[str], n: int, concurrency: int = 32) -> float:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=60) as c:
        async def one(i: int) -> None:
            async with sem:
                r = await c.post(urls[i % len(urls)] + "/v1/jobs", json=BODY)
                assert r.status_code == 202, r.text

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.perf_counter() - t0)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def throughput_rows(n: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    tmp = Path(tempfile.mkdtemp())
    manager = fake_manager(tmp, FakeProvider("fast", usd_per_second=0.001))
    with LoopbackServer(gateway_app(tmp, manager)) as srv:
        rows.append({"row": "jobs/s accepted, 1 replica, SQLite (in-process queue)",
                     "jobs_per_s": round(asyncio.run(accept([srv.url], n)), 1)})
    for replicas in (1, 2):
        with pg_database("broker_bench") as db:
            tmp = Path(tempfile.mkdtemp())
            procs = [start_replica(tmp, f"r{i}", db, tmp / "ledger.sqlite") for i in range(replicas)]
            try:
                rate = asyncio.run(accept([u for _, u in procs], n))
                rows.append({"row": f"jobs/s accepted, {replicas} replica(s), PostgreSQL (procrastinate)",
                             "jobs_per_s": round(rate, 1)})
            finally:
                for p, _ in procs:
                    p.send_signal(signal.SIGTERM)
                    p.wait(20)
    return rows


def memory_row() -> dict[str, object]:
    """RSS growth of a replica that accepts 1,000 jobs it cannot start yet (its one slot is busy)."""
    with pg_database("broker_bench") as db:
        tmp = Path(tempfile.mkdtemp())
        proc, url = start_replica(tmp, "mem", db, tmp / "ledger.sqlite", "--latency", "600", "--concurrency", "1")
        try:
            before = rss_kb(proc.pid)
            asyncio.run(accept([url], 1000))
            time.sleep(1.0)
            after = rss_kb(proc.pid)
        finally:
            proc.kill()  # its one job never ends (the provider takes 600 s)
            proc.wait(20)
    return {"row": "replica memory per 1,000 queued jobs (PostgreSQL)", "mib": round((after - before) / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=300)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = latency_rows(min(args.jobs, 200)) + throughput_rows(args.jobs) + [memory_row()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs ({platform.processor() or 'cpu'}), "
          f"Python {platform.python_version()}; loopback HTTP, fake providers (no GPU work)")
    print(f"{'measure':<62} value")
    for r in rows:
        value = ", ".join(f"{k}={v}" for k, v in r.items() if k != "row")
        print(f"{r['row']:<62} {value}")


if __name__ == "__main__":
    main()
