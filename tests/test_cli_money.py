"""`broker quote`, `broker costs` and the ledger-backed columns of `broker providers`.

One test runs the CLI in a subprocess as a user would; the rest drive the same typer app in-process
(``CliRunner``) so the suite does not pay a fresh interpreter and torch import for each.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from broker.cli import app
from broker.money.ledger import Ledger
from tests.conftest import run_cli


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture()
def cli(monkeypatch: pytest.MonkeyPatch) -> Any:
    def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        r = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
        return Result(r.exit_code, r.stdout, r.stderr if r.stderr_bytes is not None else "")

    return invoke


def test_quote_ranks_and_says_why_providers_were_dropped(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text('[manager]\nproviders = ["runpod", "local"]\n')
    proc = run_cli("quote", "Twenty words or so of text to be spoken by whichever provider is the cheapest today.",
                   "--json", "--catalog", env={"BROKER_CONFIG": str(config)})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["task"] == "speech" and data["policy"] == "cheapest"
    assert data["ranked"][-1]["provider"] == "local" and data["ranked"][-1]["fallback"] is True
    dropped = {d["provider"]: d["reason"] for d in data["dropped"]}
    assert dropped.get("runpod")  # not installed or not configured here, and it says so
    rows = data["catalog"]
    assert rows == sorted(rows, key=lambda r: (r["expected_usd"], r["expected_seconds"]))
    assert {"runpod", "modal", "replicate"} <= {r["provider"] for r in rows}


def test_quote_table_and_bad_input(cli: Any) -> None:
    proc = cli("quote", "Hello there.")
    assert proc.returncode == 0, proc.stderr
    assert "local" in proc.stdout and "expected $" in proc.stdout
    bad = run_cli("quote", "   ")
    assert bad.returncode == 2 and "text" in bad.stderr and "Traceback" not in bad.stderr


def test_costs_summarises_the_ledger_by_provider_and_day(tmp_path: Path, cli: Any) -> None:
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    now = time.time()
    ledger.record_attempt("j1", "runpod", "succeeded", started_at=now, billed_seconds=10, cost_usd=0.0076)
    ledger.record_attempt("j2", "runpod", "failed", started_at=now, billed_seconds=2, cost_usd=0.0015,
                          error_class="JobLost")
    ledger.record_attempt("j2", "modal", "succeeded", started_at=now, billed_seconds=5, cost_usd=0.002)
    ledger.record_attempt("old", "modal", "succeeded", started_at=now - 40 * 86400, cost_usd=1.0)
    ledger.close()
    env = {"BROKER_LEDGER__PATH": str(path)}
    proc = cli("costs", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["total_usd"] == round(0.0076 + 0.0015 + 0.002, 8)  # the 40-day-old row is outside 30 days
    assert data["by_provider"] == {"modal": 0.002, "runpod": round(0.0076 + 0.0015, 8)}
    runpod = next(r for r in data["rows"] if r["provider"] == "runpod")
    assert runpod["attempts"] == 2 and runpod["succeeded"] == 1 and runpod["failed"] == 1
    everything = json.loads(cli("costs", "--json", "--days", "0", env=env).stdout)
    assert everything["total_usd"] == round(1.0 + 0.0076 + 0.0015 + 0.002, 8)
    table = cli("costs", env=env)
    assert table.returncode == 0 and "runpod" in table.stdout and "total" in table.stdout


def test_providers_shows_circuit_state_and_last_error_from_the_ledger(tmp_path: Path, cli: Any) -> None:
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    now = time.time()
    for i in range(3):
        ledger.record_attempt(f"j{i}", "local", "failed", started_at=now - 5 + i, ended_at=now - 5 + i,
                              error_class="JobFailed", message="engine crashed")
    ledger.close()
    proc = cli("providers", "--json", "--no-probe", env={"BROKER_LEDGER__PATH": str(path)})
    assert proc.returncode == 0, proc.stderr
    local = next(r for r in json.loads(proc.stdout) if r["provider"] == "local")
    assert local["circuit"] == "open" and local["last_error"] == "JobFailed: engine crashed"
