"""Two gateway replicas on one real PostgreSQL: 1,000 jobs over HTTP, one replica killed with SIGKILL mid-run.

Every job completes exactly once (the job table and the ledger agree), and the webhook receiver hears of
every completion with a valid signature. And the narrow case behind that (issue 13): a replica killed after
the provider finished a job but before the job's end was recorded — the next replica finishes it from the
output the first one kept, without running or billing it again.
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

import httpx
import pytest

from broker.gateway.webhooks import verify
from broker.testing.asgi_server import LoopbackServer
from tests.gateway_support import WebhookReceiver, wait_state
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
    webhook = WebhookReceiver()
    hook, received = webhook.app, webhook.received
    ledger = tmp_path / "ledger.sqlite"
    shared = ("--outputs", str(tmp_path / "outputs"))
    with pg_database() as db, LoopbackServer(hook) as receiver:
        a, url_a = start_replica(tmp_path, "a", db, ledger, *shared)
        b, url_b = start_replica(tmp_path, "b", db, ledger, *shared)
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
        # the ledger agrees: every job was billed exactly once. A job the killed replica had finished at the
        # provider was kept (its output recorded before its attempt settled), so the other replica finished it
        # without running it again; only jobs still running at the provider when it died were run again.
        con = sqlite3.connect(ledger)
        rows = con.execute("SELECT job_id, status, owner_pid FROM attempts").fetchall()
        succeeded = Counter(job for job, status, _ in rows if status == "succeeded")
        assert set(succeeded.values()) == {1}, Counter(succeeded.values())
        # A job whose settle had not reached the ledger when its replica died (its output was kept, so it was
        # not run again) has one attempt, left open by the killed replica for the reconciler: that is its bill.
        # (A fake's job cannot be looked up from another process, so nothing settles it here.)
        unsettled = set(ids) - set(succeeded)
        for job in unsettled:
            assert [(s, pid) for j, s, pid in rows if j == job] == [("running", a.pid)], job
        assert len(unsettled) <= 16, unsettled  # at most what was in flight on the killed replica
        deadline = time.monotonic() + 30
        while {h["webhook-id"] for h, _ in received} != set(ids) and time.monotonic() < deadline:
            time.sleep(0.1)
        hooked = Counter(h["webhook-id"] for h, _ in received)
        assert set(hooked) == set(ids)
        assert all(verify(SECRET, h, body) for h, body in received)
        # at-least-once: only a completion in flight on the killed replica may be heard twice
        assert sum(n - 1 for n in hooked.values()) <= 16


#: the advisory lock the test holds to stop a replica just before it records a job's end
HOLD = 4213
_HOLD_THE_END = f"""
CREATE FUNCTION hold_the_end() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.state = 'running' AND NEW.state <> 'running' THEN
        PERFORM pg_advisory_xact_lock({HOLD});
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER hold_the_end BEFORE UPDATE ON gateway_jobs FOR EACH ROW EXECUTE FUNCTION hold_the_end();
"""


def test_replica_killed_after_the_provider_finished_is_not_billed_twice(tmp_path: Path) -> None:
    """Replica a runs a job; the provider finishes it and the ledger settles it, then a dies (SIGKILL) while
    recording the job's end (a trigger holds that UPDATE). Replica b's sweep re-queues the job and b claims
    it: b finishes it from the output a kept — one billed attempt, b's provider never called, the output
    served, the webhook sent."""
    import psycopg

    webhook = WebhookReceiver()
    hook, received = webhook.app, webhook.received
    ledger = tmp_path / "ledger.sqlite"
    shared = ("--outputs", str(tmp_path / "outputs"))
    procs: list[subprocess.Popen[bytes]] = []
    with pg_database() as db, LoopbackServer(hook) as receiver, psycopg.connect(db, autocommit=True) as con:
        try:
            a, url_a = start_replica(tmp_path, "a", db, ledger, *shared)  # creates the tables
            procs.append(a)
            con.execute(_HOLD_THE_END)
            con.execute("SELECT pg_advisory_lock(%s)", (HOLD,))
            body = {"kind": "speech", "input": {"text": "Kept before the crash."},
                    "webhook_url": f"{receiver.url}/hook"}
            r = httpx.post(url_a + "/v1/jobs", json=body, timeout=30)
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]

            def settled() -> bool:
                with sqlite3.connect(ledger) as lc:
                    return bool(lc.execute("SELECT 1 FROM attempts WHERE job_id = ? AND status = 'succeeded'",
                                           (job_id,)).fetchone())

            def held() -> bool:
                return con.execute("SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
                                   " AND wait_event_type = 'Lock' AND wait_event = 'advisory'").fetchone() is not None

            deadline = time.monotonic() + 30
            while not (held() and settled()):
                assert time.monotonic() < deadline, "replica a never reached the end of the job"
                time.sleep(0.05)
            a.kill()
            a.wait(15)
            # a's held UPDATE dies with it (rolled back), as its connection would; then let the rest through
            con.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock' AND wait_event = 'advisory'")
            con.execute("DROP TRIGGER hold_the_end ON gateway_jobs")
            con.execute("SELECT pg_advisory_unlock(%s)", (HOLD,))
            row = con.execute("SELECT state, output_key FROM gateway_jobs WHERE id = %s", (job_id,)).fetchone()
            assert row is not None and row[0] == "running", row

            b, url_b = start_replica(tmp_path, "b", db, ledger, *shared)
            procs.append(b)
            with httpx.Client(base_url=url_b, timeout=30) as c:
                view = wait_state(c, job_id, timeout=60)
                assert view["state"] == "succeeded", view
                assert view["provider"] == "fast" and view["cost_usd"] > 0, view
                out = c.get(f"/v1/jobs/{job_id}/output")
                assert out.status_code == 200 and out.content[:4] == b"RIFF", out.status_code
            with sqlite3.connect(ledger) as lc:
                attempts = lc.execute("SELECT status FROM attempts WHERE job_id = ?", (job_id,)).fetchall()
            assert attempts == [("succeeded",)]  # a's one attempt; b never called its provider
            deadline = time.monotonic() + 30
            while not received and time.monotonic() < deadline:
                time.sleep(0.05)
            assert [h["webhook-id"] for h, _ in received] == [job_id]
            assert verify(SECRET, *received[0])
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()


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
