"""`broker serve` as a user runs it: keys created on the CLI, the server on its embedded SQLite default, a real
speech job on the local engine, a second process refused without the key."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "BROKER_CONFIG": str(ROOT / "tests" / "data" / "empty.toml"),
            "BROKER_LEDGER__PATH": str(tmp / "ledger.sqlite"), "BROKER_GATEWAY__OUTPUT_DIR": str(tmp / "out"),
            "HOME": str(tmp)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_keys_create_lists_and_revokes(tmp_path: Path) -> None:
    env = _env(tmp_path)
    run = [sys.executable, "-m", "broker", "serve", "keys"]
    bad = subprocess.run([*run, "create", "--name", "alice", "--budget-usd", "0"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--budget-usd must be a positive" in bad.stderr and "Traceback" not in bad.stderr
    made = subprocess.run([*run, "create", "--name", "alice", "--rate", "30", "--budget-usd", "5",
                           "--monthly-usd", "40", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    assert key["key"].startswith("bk_") and key["rate_per_minute"] == 30
    assert (key["daily_budget_usd"], key["monthly_budget_usd"]) == (5, 40)
    listed = subprocess.run([*run, "list"], env=env, capture_output=True, text=True, timeout=60)
    assert "alice" in listed.stdout and key["key"] not in listed.stdout  # only a hint of the key is kept
    db = tmp_path / "gateway.sqlite"  # beside the ledger
    assert db.exists() and key["key"].encode() not in db.read_bytes()
    gone = subprocess.run([*run, "revoke", key["id"]], env=env, capture_output=True, text=True, timeout=60)
    assert gone.returncode == 0
    again = subprocess.run([*run, "revoke", key["id"]], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "no active key" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.local
def test_serve_runs_a_real_speech_job(tmp_path: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "broker", "serve", "--port", str(port)], env=_env(tmp_path),
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "broker serve did not start"
            time.sleep(0.1)
        with httpx.Client(base_url=url, timeout=60) as c:
            job = c.post("/v1/jobs", json={"kind": "speech", "input": {"text": "Hello from the gateway."}}).json()
            while (view := c.get(f"/v1/jobs/{job['id']}").json())["state"] not in ("succeeded", "failed"):
                assert time.monotonic() < deadline + 60
                time.sleep(0.1)
            assert view["state"] == "succeeded" and view["provider"] == "local", view
            wav = c.get(f"/v1/jobs/{job['id']}/output").content
            assert wav[:4] == b"RIFF" and len(wav) > 24_000
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    assert "in-process queue" in stderr  # it says how it runs on the embedded default
