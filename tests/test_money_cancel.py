"""Abandoned jobs are cancelled for sure (issue 11, item 1), against the RunPod emulator.

Seen before the fix: a stuck queue plus 429 on /cancel left 5 of 5 abandoned jobs to run later and
bill, while the ledger said "failed $0".
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from money_support import A100, Worker, manager, rows

from broker.errors import AllProvidersFailed
from broker.money.ledger import Ledger
from broker.testing.runpod_emulator import RunPodEmulator
from broker.types import SpeechRequest


@pytest.mark.parametrize("refusal", [429, 503])
async def test_refused_cancels_stay_cancelling_until_confirmed_and_late_runs_are_billed(
        tmp_path: Path, refusal: int) -> None:
    path = tmp_path / "ledger.sqlite"
    with RunPodEmulator(worker=False, long_poll_s=2) as emu:
        # Nobody takes jobs (a stuck queue), and RunPod refuses every cancel for now.
        emu.set_faults(cancel_refusals=100_000, cancel_refusal_status=refusal, retry_after_s=0.05)
        m = manager(emu, path)
        outcomes = await asyncio.gather(*(m.arun(SpeechRequest(text="Hello there.")) for _ in range(5)),
                                        return_exceptions=True)
        assert all(isinstance(o, AllProvidersFailed) for o in outcomes), outcomes
        abandoned = rows(path)
        assert [r["status"] for r in abandoned] == ["cancelling"] * 5  # not "failed $0"
        assert all(r["provider_job_id"] in emu.state()["jobs"] for r in abandoned)
        assert m.ledger.spent() >= sum(r["reserved_usd"] for r in abandoned) > 0  # the money is still held

        # The queue moves again before RunPod accepts the cancels: two abandoned jobs run and bill.
        worker = Worker(emu)
        ran = [await asyncio.to_thread(worker.take) for _ in range(2)]
        for job_id in ran:
            assert job_id is not None
            await asyncio.to_thread(worker.finish, job_id)
        emu.set_faults(cancel_refusals=0)
        assert await m.reconciler.drain(timeout=20)
        m.ledger.flush()

        state = emu.state()
        settled = {r["provider_job_id"]: r for r in rows(path)}
        for job_id, row in settled.items():
            remote = state["jobs"][job_id]["status"]
            if job_id in ran:
                # Billed as RunPod bills it (run + idle timeout, rounded up) — never below. delayTime cannot
                # tell queueing from a cold start, so up to the catalog's cold start may be counted on top.
                assert remote == "COMPLETED" and row["status"] == "succeeded"
                billed = state["billed_seconds"][job_id] * A100.usd_per_second
                assert billed - 1e-9 <= row["cost_usd"] <= billed + A100.cold_start_s * A100.usd_per_second + 1e-9
                assert row["cost_usd"] >= 6 * A100.usd_per_second
            else:
                assert remote == "CANCELLED" and row["status"] == "cancelled" and row["cost_usd"] == 0
        assert m.ledger.spent() == pytest.approx(sum(r["cost_usd"] for r in settled.values()))  # nothing held
        m.ledger.close()


async def test_a_cancel_is_asked_again_after_retry_after(tmp_path: Path) -> None:
    with RunPodEmulator(worker=False, long_poll_s=2) as emu:
        emu.set_faults(cancel_refusals=2, retry_after_s=0.2)  # two 429s, then accepted
        m = manager(emu, tmp_path / "l.sqlite", cancel_patience_s=5.0)
        with pytest.raises(AllProvidersFailed):
            await m.arun(SpeechRequest(text="Hello there."))
        m.ledger.flush()
        (row,) = rows(tmp_path / "l.sqlite")
        assert row["status"] == "failed" and emu.job(row["provider_job_id"])["status"] == "CANCELLED"
        assert m.reconciler.pending == 0
        m.ledger.close()


def test_a_v1_ledger_upgrades_in_place(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "v1.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE attempts (id INTEGER PRIMARY KEY, job_id TEXT NOT NULL, task TEXT, provider TEXT NOT NULL,
            hardware TEXT, provider_job_id TEXT, status TEXT NOT NULL, error_class TEXT, message TEXT,
            reserved_usd REAL NOT NULL DEFAULT 0, billed_seconds REAL, cost_usd REAL NOT NULL DEFAULT 0,
            cost_estimated INTEGER NOT NULL DEFAULT 1, hedge INTEGER NOT NULL DEFAULT 0, started_at REAL NOT NULL,
            ended_at REAL, expires_at REAL);
        CREATE INDEX attempts_open ON attempts (started_at) WHERE status IN ('reserved', 'running');
        INSERT INTO attempts (job_id, provider, status, reserved_usd, cost_usd, started_at)
            VALUES ('old', 'runpod', 'succeeded', 0.1, 0.05, 1.0);
    """)
    db.commit()
    db.close()
    for _ in range(2):  # the upgrade is idempotent
        ledger = Ledger(path)
        assert ledger._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "3"
        (old,) = ledger.attempts()
        assert old["cost_usd"] == 0.05 and old["owner_pid"] is None and old["unpriced"] == 0
        assert old["tenant"] is None  # v3: attempts carry their tenant
        ledger.close()


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_orphans_are_found_by_dead_pid_or_stale_heartbeat(tmp_path: Path) -> None:
    import socket
    import time

    from broker.routing.reconcile import pid_alive

    ledger = Ledger(tmp_path / "l.sqlite")
    mine, _ = ledger.open_attempt("j", "runpod", reserved_usd=0.1)
    dead, _ = ledger.open_attempt("j", "runpod", reserved_usd=0.1)
    far_fresh, _ = ledger.open_attempt("j", "runpod", reserved_usd=0.1)
    far_stale, _ = ledger.open_attempt("j", "runpod", reserved_usd=0.1)
    now = time.time()
    owners = {dead: (_dead_pid(), socket.gethostname(), now), far_fresh: (1, "elsewhere", now),
              far_stale: (1, "elsewhere", now - 600)}
    for aid, (pid, host, beat) in owners.items():
        ledger._db.execute("UPDATE attempts SET owner_pid = ?, owner_host = ?, heartbeat_at = ? WHERE id = ?",
                           (pid, host, beat, aid))
    found = {r["id"] for r in ledger.orphans(stale_s=120, alive=pid_alive)}
    assert found == {dead, far_stale}  # never our own rows, never a live owner's
    assert ledger.claim(ledger.attempts()[1]) and not ledger.claim(ledger.attempts()[1] | {"owner_pid": -1})
    assert mine not in found
    ledger.close()


async def test_the_next_manager_settles_a_dead_process_rows_on_its_own(tmp_path: Path) -> None:
    from money_support import runpod

    path = tmp_path / "l.sqlite"
    with RunPodEmulator(worker=False, long_poll_s=2) as emu:
        # A job a dead process submitted and wrote ahead, reservation still held.
        rp = runpod(emu, queue_timeout_s=None)
        job = await rp.submit(SpeechRequest(text="Hello there."))
        ledger = Ledger(path)
        aid, _ = ledger.open_attempt("dead-job", "runpod", reserved_usd=0.5)
        ledger.started(aid, job.id)
        ledger._db.execute("UPDATE attempts SET owner_pid = ? WHERE id = ?", (_dead_pid(), aid))
        ledger.close()
        await rp.aclose()

        m = manager(emu, path)
        late = await m.submit(SpeechRequest(text="Hello there."))  # any job: opening work reconciles first
        report = await m.reconciler._sweep  # type: ignore[misc]
        await late.cancel()
        assert [r["id"] for r in report.settled] == [aid]
        assert emu.job(job.id)["status"] == "CANCELLED"
        (row,) = [r for r in m.ledger.attempts() if r["id"] == aid]
        assert row["status"] == "cancelled" and m.ledger.spent(job_id="dead-job") == 0
        m.ledger.close()


@pytest.mark.usefixtures("piper_available")
async def test_replicate_cancel_is_asked_again_through_an_outage() -> None:
    from broker.types import build
    from tests.replicate_support import emulator, provider

    with emulator() as server:
        server.emulator.faults.update(stuck=True)  # no worker: the prediction stays `starting`
        p = provider(server, wait_s=0, queue_timeout_s=None)
        job = await p.submit(build(SpeechRequest, text="Nobody will run me."))
        server.emulator.faults.update(outage=True)  # every call answers 503, the cancel too
        cancelling = asyncio.ensure_future(job.cancel(patience_s=20))
        await asyncio.sleep(0.5)  # a few refused cancels
        assert not cancelling.done() and job.cancel_pending
        server.emulator.faults.update(outage=False)
        assert await asyncio.wait_for(cancelling, 20)
        assert server.emulator.predictions[job.id].status == "canceled" and not job.cancel_pending
        await p.aclose()


class RefusingModal:
    """A ``ModalCalls`` (the provider's SDK seam) whose calls never finish and whose first cancels fail."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.cancelled: list[str] = []

    async def spawn(self, method: str, payload: dict[str, object]) -> str:
        return f"fc-{len(self.cancelled)}-{method}"

    async def poll(self, call_id: str) -> None:
        return None  # still running

    async def cancel(self, call_id: str) -> None:
        from broker.errors import ProviderUnavailable

        if self.refusals > 0:
            self.refusals -= 1
            raise ProviderUnavailable("Modal did not answer cancel within 15 s", provider="modal")
        self.cancelled.append(call_id)

    async def stream(self, method: str, payload: dict[str, object]):  # type: ignore[no-untyped-def]
        raise NotImplementedError
        yield

    async def describe(self) -> dict[str, object]:
        return {}


async def test_modal_cancel_is_asked_again_until_modal_takes_it() -> None:
    from broker.providers.modal import ModalProvider

    calls = RefusingModal(refusals=2)
    provider = ModalProvider(lookup=lambda app, cls: calls)  # type: ignore[arg-type,return-value]
    job = await provider.submit(SpeechRequest(text="Hello there."))
    assert await job.cancel(patience_s=5) and calls.cancelled == [job.id]
    unconfirmed = await provider.submit(SpeechRequest(text="Hello there."))
    calls.refusals = 100
    assert not await unconfirmed.cancel(patience_s=0.3) and unconfirmed.cancel_pending
