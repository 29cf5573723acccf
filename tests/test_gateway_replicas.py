"""Two gateway replicas on one real PostgreSQL: 1,000 jobs over HTTP, one replica killed with SIGKILL mid-run.

Every job completes exactly once (the job table and the ledger agree), and the webhook receiver hears of
every completion with a valid signature.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from broker.gateway.webhooks import verify
from broker.testing.asgi_server import LoopbackServer
from tests.pg import pg_database

ROOT = Path(__file__).resolve().parents[1]
SECRET = "replica-secret"
JOBS = 1000


def start_replica(tmp: Path, name: str, db: str, ledger: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port_file = tmp / f"{name}.port"
    d = tmp / name
    d.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(d / "stderr.log", "wb")  # noqa: SIM115  # the replica writes to it until it is stopped
    proc = subprocess.Popen([sys.executable, "-m", "tests.gateway_replica", "--db", db, "--dir", str(d),
                             "--ledger", str(ledger), "--port-file", str(port_file), "--webhook-secret", SECRET,
                             *extra],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 60
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"replica {name} did not start: {(d / 'stderr.log').read_text()[-2000:]}")
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port_file.read_text()}"
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"replica {name} not ready: {(d / 'stderr.log').read_text()[-2000:]}")
        time.sleep(0.05)


@pytest.mark.slow
def test_two_replicas_1000_jobs_one_killed(tmp_path: Path) -> None:
    received: list[tuple[dict[str, str], bytes]] = []
    hook = FastAPI()

    @hook.post("/hook")
    async def _hook(request: Request) -> dict[str, Any]:
        received.append((dict(request.headers), await request.body()))
        return {"ok": True}

    ledger = tmp_path / "ledger.sqlite"
    with pg_database() as db, LoopbackServer(hook) as receiver:
        a, url_a = start_replica(tmp_path, "a", db, ledger)
        b, url_b = start_replica(tmp_path, "b", db, ledger)
        try:
            ids = asyncio.run(_submit_all(url_a, url_b, a, f"{receiver.url}/hook"))
            states = _wait_all_terminal(url_b, ids)
        finally:
            for p in (a, b):
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in (a, b):
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
        assert a.returncode == -signal.SIGKILL
        assert Counter(states.values()) == Counter({"succeeded": JOBS})
        # the ledger agrees: every job has a succeeded attempt, and nothing else is in it. A job the killed
        # replica had finished at the provider but not yet recorded is run again (its output died with it):
        # that second bill is bounded by the jobs in flight there (its concurrency, 16). Persisting the output
        # before the attempt settles would close that window; it is open work on issue 13.
        con = sqlite3.connect(ledger)
        rows = con.execute("SELECT job_id, COUNT(*) FROM attempts WHERE status = 'succeeded' GROUP BY job_id")
        succeeded = dict(rows.fetchall())
        assert set(succeeded) == set(ids)
        assert sum(n - 1 for n in succeeded.values()) <= 16, Counter(succeeded.values())
        deadline = time.monotonic() + 30
        while {h["webhook-id"] for h, _ in received} != set(ids) and time.monotonic() < deadline:
            time.sleep(0.1)
        hooked = Counter(h["webhook-id"] for h, _ in received)
        assert set(hooked) == set(ids)
        assert all(verify(SECRET, h, body) for h, body in received)
        # at-least-once: only a completion in flight on the killed replica may be heard twice
        assert sum(n - 1 for n in hooked.values()) <= 16


async def _submit_all(url_a: str, url_b: str, a: subprocess.Popen[bytes], hook: str) -> list[str]:
    ids: list[str] = []
    sem = asyncio.Semaphore(24)
    killed = asyncio.Event()
    async with httpx.AsyncClient(timeout=30) as c:
        async def one(i: int) -> None:
            body = {"kind": "speech", "input": {"text": f"Job number {i}. A short sentence."}, "webhook_url": hook}
            key = {"Idempotency-Key": f"job-{i}-{uuid.uuid4().hex[:6]}"}
            async with sem:
                for url in ((url_a, url_b) if i % 2 and not killed.is_set() else (url_b,)):
                    try:
                        r = await c.post(url + "/v1/jobs", json=body, headers=key)
                    except httpx.HTTPError:
                        continue  # the killed replica: the same key goes to the other one
                    assert r.status_code in (200, 202), r.text
                    ids.append(r.json()["id"])
                    return
                raise AssertionError(f"job {i} not accepted")

        async def killer() -> None:
            while len(ids) < JOBS * 0.4:
                await asyncio.sleep(0.01)
            a.send_signal(signal.SIGKILL)
            killed.set()

        kill = asyncio.create_task(killer())
        await asyncio.gather(*(one(i) for i in range(JOBS)))
        await kill
    assert len(set(ids)) == JOBS
    return ids


def _wait_all_terminal(url: str, ids: list[str], timeout: float = 240.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    with httpx.Client(base_url=url, timeout=30) as c:
        pending = set(ids)
        while pending:
            cursor = None
            while True:
                page = c.get("/v1/jobs", params={"limit": 200, **({"cursor": cursor} if cursor else {})}).json()
                for j in page["jobs"]:
                    states[j["id"]] = j["state"]
                cursor = page["next_cursor"]
                if not cursor:
                    break
            pending = {i for i in ids if states.get(i) not in ("succeeded", "failed", "cancelled", "lost")}
            if not pending:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(pending)} jobs unfinished, e.g. {sorted(pending)[:3]}: "
                                     f"{Counter(states.values())}")
            threading.Event().wait(0.5)
    return states
