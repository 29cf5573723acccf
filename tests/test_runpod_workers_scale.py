"""`broker emulate runpod --workers N`: N real SDK workers, or from zero with a cold start per waiting job."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from broker.testing.runpod_emulator import RunPodEmulator

# a real runpod SDK worker, tiny: the scaling is under test here, not the engines
HANDLER = """
import time
import runpod

def handler(job):
    time.sleep(float(job["input"].get("sleep", 0)))
    return {"ok": True}

runpod.serverless.start({"handler": handler})
"""


def wait_for(cond, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.05)


@pytest.mark.slow
def test_scale_from_zero_starts_one_cold_worker_per_waiting_job_up_to_the_max(tmp_path: Path) -> None:
    handler = tmp_path / "handler.py"
    handler.write_text(HANDLER)
    with RunPodEmulator(handler_path=handler, workers_max=2, scale_from_zero=True, long_poll_s=2) as emu:
        time.sleep(0.5)
        assert emu.workers == {}  # nothing runs (or bills) before there is work
        headers = {"Authorization": f"Bearer {emu.api_key}"}
        with httpx.Client(base_url=emu.base_url, headers=headers, timeout=10) as client:
            ids = [client.post(f"/{emu.endpoint_id}/run", json={"input": {"sleep": 1.0}}).json()["id"]
                   for _ in range(3)]
            wait_for(lambda: all(client.get(f"/{emu.endpoint_id}/status/{i}").json()["status"] == "COMPLETED"
                                 for i in ids), timeout=120)
        assert len(emu.workers) == 2  # three waiting jobs, but workersMax is 2
        assert len(emu.cold_starts) == 2 and all(s > 0 for _, s in emu.cold_starts)
        taken_by = {emu.job(i)["workerId"] for i in ids}
        assert taken_by == set(emu.workers)


@pytest.mark.slow
def test_workers_max_starts_that_many_sdk_workers(tmp_path: Path) -> None:
    handler = tmp_path / "handler.py"
    handler.write_text(HANDLER)
    with RunPodEmulator(handler_path=handler, workers_max=3, long_poll_s=2) as emu:
        wait_for(lambda: len(emu.cold_starts) == 3, timeout=120)
        assert len(emu.workers) == 3 and all(w.alive for w in emu.workers.values())
