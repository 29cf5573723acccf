"""A stopped client does not orphan remote work (issue 11, item 2), with real processes.

Seen before the fix: SIGTERM during `broker speak` left the RunPod job to complete and bill with no
ledger row; kill -9 with 25 reservations open left 25 remote jobs running and 25 rows `reserved`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli
from money_support import rows

from broker.money.ledger import Ledger
from broker.testing.runpod_emulator import RunPodEmulator

pytestmark = pytest.mark.slow


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll ``check`` (another process's progress: there is no event to wait on) until truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def env_for(emu: RunPodEmulator, ledger: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, **emu.env(), "BROKER_LEDGER__PATH": str(ledger), "BROKER_MANAGER__PROVIDERS": '["runpod"]',
            "BROKER_MANAGER__FALLBACK_LOCAL": "false", "BROKER_RUNPOD__QUEUE_TIMEOUT_S": "600", **extra}


def open_rows(ledger: Path) -> list[dict[str, Any]]:
    return [r for r in rows(ledger) if r["status"] == "running" and r["provider_job_id"]] if ledger.exists() else []


def test_sigterm_cancels_the_remote_job_and_settles_its_row(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.sqlite"
    with RunPodEmulator(worker=False, long_poll_s=2) as emu:  # nobody takes the job: it waits in the queue
        proc = subprocess.Popen([sys.executable, "-m", "broker", "speak", "Hello there.", "-o",
                                 str(tmp_path / "out.wav"), "--provider", "runpod"],
                                env=env_for(emu, ledger), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # Write-ahead: the job id is in the ledger while we are still waiting on the job.
            (row,) = wait_for("the write-ahead row", lambda: open_rows(ledger))
            assert emu.job(row["provider_job_id"])["status"] == "IN_QUEUE"
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 143, stderr
        assert "SIGTERM" in stderr and "Traceback" not in stderr
        assert emu.job(row["provider_job_id"])["status"] == "CANCELLED"
        (settled,) = rows(ledger)
        assert settled["status"] == "cancelled" and settled["cost_usd"] == 0.0
    assert not list(tmp_path.glob(".out.wav*")) and not (tmp_path / "out.wav").exists()  # no temp files left


KILLED_CLIENT = """
import asyncio
from broker.routing.manager import CloudGPUManager
from broker.types import SpeechRequest

async def main():
    manager = CloudGPUManager()
    await asyncio.gather(*(manager.arun(SpeechRequest(text=f"job {i} says hello")) for i in range(6)))

asyncio.run(main())
"""


def test_after_kill_9_the_next_process_cancels_and_settles_and_releases(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.sqlite"
    with RunPodEmulator(worker=False, long_poll_s=2) as emu:
        env = env_for(emu, ledger, BROKER_MANAGER__DAILY_BUDGET_USD="5")
        proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            held = wait_for("six write-ahead rows", lambda: len(open_rows(ledger)) == 6 and open_rows(ledger))
        finally:
            proc.kill()  # SIGKILL: nothing runs in the client any more
            proc.wait(timeout=30)
        assert {r["owner_pid"] for r in held} == {proc.pid}
        before = Ledger(ledger)
        assert before.spent(window_s=86400) > 0  # six reservations still held by a dead process
        before.close()
        assert all(emu.job(r["provider_job_id"])["status"] == "IN_QUEUE" for r in held)

        result = run_cli("reconcile", "--json", env=env, timeout=120)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["settled"] == 6 and report["cancelling"] == 0, report
        assert all(emu.job(r["provider_job_id"])["status"] == "CANCELLED" for r in held)
        after = Ledger(ledger)
        assert {r["status"] for r in after.attempts()} == {"cancelled"}
        assert after.spent(window_s=86400) == 0.0  # released at once, not at expiry
        after.close()
        # Reconciling again finds nothing: the rows are settled, and claimed only once.
        again = json.loads(run_cli("reconcile", "--json", env=env, timeout=120).stdout)
        assert again["settled"] == 0
