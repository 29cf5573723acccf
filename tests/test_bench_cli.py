"""`broker bench --estimate` on a fresh machine (empty config, no cloud), as a user runs it; and its bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from broker.cli import app
from broker.money.pricing import Catalog
from tests.conftest import ROOT, run_cli

EMPTY = {"BROKER_CONFIG": str(ROOT / "tests" / "data" / "empty.toml"), "BROKER_LOCAL__DEVICE": "cpu",
         "RUNPOD_API_KEY": "", "REPLICATE_API_TOKEN": "", "MODAL_TOKEN_ID": "", "MODAL_TOKEN_SECRET": ""}


@pytest.fixture(scope="module")
def estimate(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    home = out / "home"
    home.mkdir()
    # A fresh HOME: nothing may be read from (or written to) a developer's own files.
    r = run_cli("bench", "--estimate", "--json", "--volume", "500", "--warm-runs", "1", "--csv", str(out / "b.csv"),
                "--plot", str(out / "b.png"), env={**EMPTY, "HOME": str(home)}, timeout=240)
    assert r.returncode == 0, r.stderr
    data: dict[str, Any] = json.loads(r.stdout)
    data["_dir"] = out
    data["_home"] = home
    return data


def test_every_catalog_row_is_priced_for_every_workload(estimate: dict[str, Any]) -> None:
    rows = estimate["rows"]
    assert [w["label"] for w in estimate["workloads"]] == ["500 words", "2,000 words", "10,000 words",
                                                           "10 s render", "60 s render"]
    estimated = {(r["provider"], r["hardware"], r["workload"]) for r in rows if not r["measured"]}
    for price in Catalog.packaged().prices():
        for w in estimate["workloads"]:
            assert (price.provider, price.hardware[0], w["label"]) in estimated
    for r in rows:
        assert r["wall_s"] > 0 and r["run_s"] > 0 and r["warm_wall_s"] <= r["wall_s"] + 1e-9
        assert r["usd"] is not None and r["usd"] >= 0 and r["usd_per_output_min"] >= 0
        assert r["speed_basis"] in ("measured", "published", "estimate", "config") and r["speed_source"]
        assert r["price_basis"] in ("published", "estimate", "config")
        assert r["measured"] == (r["provider"] == "local" and "measured live" in r["speed_source"])
        if r["price_basis"] == "published":
            assert r["price_source"].startswith("https://") and r["price_checked"]


def test_longer_work_costs_more_on_per_second_billing(estimate: dict[str, Any]) -> None:
    by_key: dict[tuple[str, str], dict[str, float]] = {}
    for r in estimate["rows"]:
        by_key.setdefault((r["provider"], r["hardware"]), {})[r["workload"]] = r["usd"]
    for price in Catalog.packaged().prices():
        if price.usd_per_second > 0:
            costs = by_key[(price.provider, price.hardware[0])]
            assert costs["10,000 words"] > costs["500 words"], price
            assert costs["60 s render"] > costs["10 s render"], price


def test_local_is_measured_here_and_everything_compares_to_it(estimate: dict[str, Any]) -> None:
    local = [r for r in estimate["rows"] if r["measured"]]
    assert {r["workload"] for r in local} >= {"500 words", "2,000 words", "10,000 words"}
    assert all(r["speedup_vs_local"] == pytest.approx(1.0) for r in local)
    speech = [r for r in estimate["rows"] if r["task"] == "speech"]
    assert all(r["speedup_vs_local"] > 0 for r in speech)
    assert all(r["saving_vs_local"] is None for r in speech), "local is free: no $ saving to state"
    assert estimate["seconds_per_word"]["basis"] == "measured"
    cal = estimate["calibrations"][0]
    assert cal["provider"] == "local" and cal["jobs"][0]["cold"] and cal["jobs"][0]["ok"]
    # no cloud was configured: nothing was called, and estimating wrote no ledger or config into HOME
    # (library caches such as matplotlib's font list may appear under ~/.cache)
    assert {s["provider"] for s in estimate["skipped"]} <= {"local"}
    written = [p for p in estimate["_home"].rglob("*") if p.is_file() and ".cache" not in p.parts]
    assert not written, written


def test_monthly_projection_and_files(estimate: dict[str, Any]) -> None:
    monthly = estimate["monthly"]
    assert len(monthly) == len(estimate["rows"]) and all(m["jobs"] == 500 for m in monthly)
    runpod = next(m for m in monthly if m["provider"] == "runpod" and m["workload"] == "500 words")
    assert runpod["usd"] > runpod["usd_idle"] > 0 and 0.9 < runpod["cold_share"] <= 1.0
    out: Path = estimate["_dir"]
    with (out / "b.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(estimate["rows"]) and {"provider", "usd", "speed_basis"} <= set(table[0])
    png = (out / "b.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000


def test_bad_workloads_are_one_line_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in EMPTY.items():
        monkeypatch.setenv(k, v)
    runner = CliRunner()
    r = runner.invoke(app, ["bench", "--words", "500,lots", "--no-local"])
    assert r.exit_code == 2 and "words" in r.stderr and "lots" in r.stderr and "Traceback" not in r.stderr
    r = runner.invoke(app, ["bench", "--words", "none", "--render-seconds", "none", "--no-local"])
    assert r.exit_code == 2 and "nothing to bench" in r.stderr


def test_table_output_without_local(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in EMPTY.items():
        monkeypatch.setenv(k, v)
    r = CliRunner().invoke(app, ["bench", "--no-local", "--words", "500", "--render-seconds", "none",
                                 "--providers", "runpod,local", "--local-usd-per-hour", "0.36"],
                           env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.stderr
    assert "500 words of speech" in r.stdout and "runpod" in r.stdout and "modal" not in r.stdout
    assert "a100-80gb" in r.stdout and "estimate / published" in r.stdout
    # local priced at $0.36/h: savings can now be stated in dollars as well as time
    assert "cheaper" in r.stdout or "dearer" in r.stdout
    assert "https://docs.runpod.io/serverless/pricing" in r.stdout


def test_markdown_pivot_for_the_readme(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in EMPTY.items():
        monkeypatch.setenv(k, v)
    r = CliRunner().invoke(app, ["bench", "--no-local", "--providers", "runpod,http", "--hardware", "A100-80GB,cpu",
                                 "--markdown"])
    assert r.exit_code == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| provider | hardware | 500 words | 2,000 words | 10,000 words | vs local")
    body = [ln for ln in lines if not ln.startswith(("| provider", "| ---"))]
    # runpod a100-80gb and cpu, http cpu; for speech and for render
    assert len(body) == 6 and sum("a100-80gb" in ln for ln in body) == 2
    assert all(ln.count(" · $") >= 2 for ln in body)
