"""scripts/reliability.py replays issue 11's "Seen" cases; with short settings every money row is clean."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_reliability_script_reports_zeros_for_every_money_case() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "reliability.py"), "--short", "--json"],
                          capture_output=True, text=True, timeout=280, env={**os.environ, "PYTHONPATH": str(ROOT)})
    report = json.loads(done.stdout)
    rows = {r["case"]: r for r in report["rows"]}
    money = [name for name in rows if name not in report["pending"]]
    assert len(money) >= 8, rows.keys()  # items 1-4: cancels, SIGTERM, kill -9, prices, queue, budget room
    for name in money:
        r = rows[name]
        assert r["tried"] > 0 and (r["mishandled"], r["orphaned"]) == (0, 0) and r["unrecorded_usd"] < 1e-9, r
    assert done.returncode == 0, done.stderr[-2000:]
