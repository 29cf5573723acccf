"""`broker bench --live` end to end, as a user runs it: the CLI in a subprocess measures

- RunPod through the loopback emulator with the REAL runpod SDK worker behind it,
- Replicate through the hosted-API emulator in front of the REAL Cog runtime,
- and the local engine,

and turns what it saw (RunPod delayTime/executionTime, Replicate setup + metrics.predict_time,
local run time) into priced rows. One emulator of each, started once; short workloads.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.testing.replicate_emulator import EmulatorServer, ReplicateEmulator
from broker.testing.runpod_emulator import RunPodEmulator
from tests.conftest import ROOT, run_cli
from tests.replicate_support import TOKEN, shared_runtime

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("piper_available")]

WORKER_ENV = {"BROKER_LOCAL__DEVICE": "cpu"}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("bench-live")
    # The RunPod worker boots (imports, Piper load) while the Cog runtime starts: the first RunPod
    # calibration job may well meet a worker still booting, as after a scale-from-zero.
    runpod = RunPodEmulator(worker_env=WORKER_ENV, long_poll_s=5).start()
    try:
        with EmulatorServer(ReplicateEmulator(shared_runtime().url, token=TOKEN, seed=3)) as replicate:
            env = {
                **runpod.env(), **WORKER_ENV,
                "BROKER_CONFIG": str(ROOT / "tests" / "data" / "empty.toml"),
                "BROKER_LEDGER__PATH": str(tmp / "ledger.sqlite"),
                "REPLICATE_API_TOKEN": TOKEN,
                "BROKER_REPLICATE__MODEL": "broker/broker",
                "BROKER_REPLICATE__BASE_URL": f"{replicate.url}/v1",
                "BROKER_RUNPOD__QUEUE_TIMEOUT_S": "180",
            }
            r = run_cli("bench", "--live", "--providers", "runpod,replicate,local", "--words", "200,2000",
                        "--render-seconds", "5", "--warm-runs", "1", "--timeout", "180", "--volume", "100",
                        "--json", env=env, timeout=420)
            assert r.returncode == 0, r.stderr[-3000:] + runpod.worker_log_tail()
            data: dict[str, Any] = json.loads(r.stdout)
            data["_runpod_state"] = runpod.state()
            data["_replicate_predictions"] = len(replicate.emulator.predictions)
            data["_ledger"] = tmp / "ledger.sqlite"
            data["_secrets"] = (runpod.api_key, TOKEN)
            data["_output"] = r.stdout + r.stderr
            yield data
    finally:
        runpod.stop()


def rows_of(data: dict[str, Any], provider: str) -> dict[str, dict[str, Any]]:
    return {r["workload"]: r for r in data["rows"] if r["provider"] == provider}


def calibration(data: dict[str, Any], provider: str) -> dict[str, Any]:
    return next(c for c in data["calibrations"] if c["provider"] == provider)


def test_each_provider_was_measured_through_its_own_api(live: dict[str, Any]) -> None:
    assert live["mode"] == "live"
    assert [c["provider"] for c in live["calibrations"]] == ["runpod", "replicate", "local"]
    for name, source in (("runpod", "provider metrics"), ("replicate", "provider metrics"),
                         ("local", "provider metrics + job timestamps")):
        speech = [j for j in calibration(live, name)["jobs"] if j["task"] == "speech"]
        assert [j["cold"] for j in speech] == [True, False] and all(j["ok"] for j in speech), speech
        assert all(j["timing_source"] == source for j in speech), (name, speech)
        assert all(j["run_s"] > 0 and j["output_s"] > 1 for j in speech)
    # the emulators really ran them: RunPod jobs COMPLETED by the SDK worker, Replicate predictions made
    completed = [j for j in live["_runpod_state"]["jobs"].values() if j["status"] == "COMPLETED"]
    assert len(completed) >= 2 and all("executionTime" in j and "delayTime" in j for j in completed)
    assert live["_replicate_predictions"] >= 2


def test_rows_are_measured_priced_and_extrapolated(live: dict[str, Any]) -> None:
    for name, hardware in (("runpod", "a100-80gb"), ("replicate", "gpu-l40s"), ("local", "cpu")):
        rows = rows_of(live, name)
        assert set(rows) == {"200 words", "2,000 words", "5 s render"}
        small, big = rows["200 words"], rows["2,000 words"]
        assert small["measured"] and big["measured"] and small["hardware"] == hardware
        assert big["run_s"] > small["run_s"] > 0 and big["output_s"] == pytest.approx(10 * small["output_s"])
        assert small["wall_s"] >= small["warm_wall_s"] > 0
        assert small["speed_source"].lower().startswith(f"{name} {hardware}: measured live")
        render = rows["5 s render"]
        # measured where the render engine runs here; otherwise the profile, saying why
        assert render["measured"] or any("render not measured" in n for n in render["notes"])
        if name != "local":
            assert big["usd"] > small["usd"] > 0 and small["price_basis"] == "published"
            # the emulators keep a worker up, so the scale-to-zero cold start is the catalog's, labelled
            assert small["cold_basis"] in ("measured", "estimate")
    local = rows_of(live, "local")["2,000 words"]
    assert local["speedup_vs_local"] == pytest.approx(1.0) and local["usd"] == 0
    assert live["seconds_per_word"]["basis"] == "measured"
    assert len(live["monthly"]) == len(live["rows"])


def test_calibration_spend_is_in_the_ledger(live: dict[str, Any]) -> None:
    ledger: Path = live["_ledger"]
    with sqlite3.connect(ledger) as db:
        rows = db.execute("SELECT provider, status, cost_usd, task FROM attempts").fetchall()
    jobs = sum(len(c["jobs"]) for c in live["calibrations"])
    assert len(rows) == jobs
    assert {p for p, *_ in rows} == {"runpod", "replicate", "local"}
    assert sum(c for *_, c, _ in rows) == pytest.approx(live["calibration_cost_usd"])
    assert live["calibration_cost_usd"] > 0


def test_no_credential_reaches_the_output_or_the_ledger(live: dict[str, Any]) -> None:
    ledger_bytes = Path(live["_ledger"]).read_bytes()
    for secret in live["_secrets"]:
        assert secret not in live["_output"]
        assert secret.encode() not in ledger_bytes
