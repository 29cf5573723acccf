"""Endpoints end to end, against the RunPod emulator with the REAL runpod SDK worker behind it.

- A fresh config where only what `broker emulate runpod` prints is exported: `broker speak` is served by
  runpod (no `manager.providers`, no `--provider`), `broker quote` ranks it, the ledger names it.
- Two RunPod endpoints from [endpoints.*] tables, a CPU one carrying Piper and a GPU one carrying CSM
  (a tiny random CSM checkpoint, loaded by the worker like real weights): each gets only the jobs it can run.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.media import Audio
from broker.routing.manager import CloudGPUManager
from broker.settings import Settings
from broker.testing.runpod_emulator import RunPodEmulator
from tests.conftest import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("piper_available")]

WORKER_ENV = {"BROKER_LOCAL__DEVICE": "cpu"}
KEY = "rpa_emulated_shared_key_0123456789"
CREDENTIALS = ("RUNPOD_API_KEY", "REPLICATE_API_TOKEN", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "BROKER_WORKER_API_KEY")


def fresh_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An empty config, its own ledger, no Modal profile: nothing a user would not have on a new machine."""
    config = tmp_path / "broker.toml"
    config.touch()
    return {"BROKER_CONFIG": str(config), "BROKER_LEDGER__PATH": str(tmp_path / "ledger.sqlite"),
            "MODAL_CONFIG_PATH": str(tmp_path / "no-modal.toml"), **extra}


def engines_seen(emu: RunPodEmulator) -> list[str | None]:
    return [(j.input.get("input") or {}).get("engine") for j in emu.book.jobs.values()]


@pytest.fixture(scope="module")
def emu() -> Iterator[RunPodEmulator]:
    with RunPodEmulator(mode="stream", api_key=KEY, worker_env=WORKER_ENV, long_poll_s=5) as emulator:
        emulator.wait_for_worker(timeout=180)
        yield emulator


def test_exporting_what_emulate_prints_routes_speak_and_quote_to_runpod(emu: RunPodEmulator, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    for var in CREDENTIALS:
        monkeypatch.delenv(var, raising=False)
    env = fresh_env(tmp_path, **emu.env())
    out = tmp_path / "hello.wav"
    proc = run_cli("speak", "Hello from a fresh config.", "-o", str(out), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["provider"] == "runpod", data
    assert [a["provider"] for a in data["attempts"]] == ["runpod"] and data["attempts"][0]["provider_job_id"]
    assert Audio.from_file(out).duration_s > 0.5
    assert any(j.status == "COMPLETED" for j in emu.book.jobs.values())

    quote = run_cli("quote", "Hello from a fresh config.", "--json", env=env)
    assert quote.returncode == 0, quote.stderr
    ranked = json.loads(quote.stdout)["ranked"]
    assert [(r["provider"], r["role"]) for r in ranked] == [("runpod", "ranked"), ("local", "fallback")]
    assert ranked[0]["priced"] and ranked[0]["expected_usd"] > 0

    providers = run_cli("providers", "--json", env=env)
    rows = {r["provider"]: r for r in json.loads(providers.stdout)}
    assert rows["runpod"]["routed"] is True and rows["runpod"]["state"] == "healthy"
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:  # the ledger names the endpoint
        assert {r[0] for r in db.execute("SELECT provider FROM attempts")} == {"runpod"}


@pytest.fixture(scope="module")
def tiny_csm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    from tests.test_csm_engine import build_tiny_csm

    return build_tiny_csm(tmp_path_factory.mktemp("tiny-csm"))


@pytest.fixture(scope="module")
def two_endpoints(emu: RunPodEmulator, tiny_csm: Path) -> Iterator[tuple[RunPodEmulator, RunPodEmulator]]:
    """The CPU endpoint is the module's emulator; the GPU one is a second emulator whose worker has CSM."""
    gpu = RunPodEmulator(mode="job", api_key=KEY, long_poll_s=5,
                         worker_env={**WORKER_ENV, "BROKER_ENGINES__CSM_PATH": str(tiny_csm)})
    with gpu:
        gpu.wait_for_worker(timeout=180)
        yield emu, gpu


async def test_a_cpu_and_a_gpu_endpoint_each_get_only_the_jobs_they_can_run(
        two_endpoints: tuple[RunPodEmulator, RunPodEmulator], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, gpu = two_endpoints
    for var in CREDENTIALS:
        monkeypatch.delenv(var, raising=False)
    env = fresh_env(tmp_path, RUNPOD_API_KEY=KEY)
    Path(env["BROKER_CONFIG"]).write_text(f"""
[endpoints.rp-cpu]
kind = "runpod"
endpoint_id = "{cpu.endpoint_id}"
base_url = "{cpu.base_url}"
hardware = "cpu"
engines = ["piper"]

[endpoints.rp-gpu]
kind = "runpod"
endpoint_id = "{gpu.endpoint_id}"
base_url = "{gpu.base_url}"
hardware = "A100-80GB"
engines = ["csm"]
queue_timeout_s = 120
""")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    manager = CloudGPUManager(settings=Settings())
    assert [p.name for p in manager.providers] == ["rp-cpu", "rp-gpu"]
    try:
        piper = await manager.agenerate_speech("Piper speaks on the CPU endpoint.", return_tensor=False)
        csm = await manager.agenerate_speech("Hi.", engine="csm", max_length_ms=1_000, return_tensor=False)
    finally:
        await manager.aclose()
        manager.close()
    assert piper.report is not None and csm.report is not None
    assert [(a.provider, a.outcome) for a in piper.report.attempts] == [("rp-cpu", "succeeded")]
    assert [(a.provider, a.outcome) for a in csm.report.attempts] == [("rp-gpu", "succeeded")]
    assert piper.duration_s > 0.5 and 0 < csm.duration_s <= 1.0
    assert "csm" not in engines_seen(cpu) and engines_seen(gpu) == ["csm"]  # nothing went where it could not run

    quote = run_cli("quote", "Which endpoint takes CSM?", "--engine", "csm", "--json", env=env)
    data: dict[str, Any] = json.loads(quote.stdout)
    assert data["ranked"][0]["provider"] == "rp-gpu"
    assert {"provider": "rp-cpu", "reason": "does not have the 'csm' engine", "stage": "plan"} in data["dropped"]
