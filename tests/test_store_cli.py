"""`broker costs` and `broker providers` read the shared PostgreSQL store when ledger.url names one."""

from __future__ import annotations

import json
import time

from typer.testing import CliRunner

from broker.cli import app
from broker.store import HealthEvent, open_store
from broker.store.pg_health import PostgresHealth
from tests.store_support import pg_url  # noqa: F401  (fixture)


def _cli(*args: str, url: str) -> tuple[int, str]:
    r = CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "BROKER_LEDGER__URL": url})
    return r.exit_code, r.stdout


def test_costs_sums_what_every_process_wrote_to_the_shared_ledger(pg_url: str) -> None:  # noqa: F811
    now = time.time()
    for provider, cost in (("runpod", 0.0076), ("modal", 0.002)):
        other_process = open_store(pg_url)
        other_process.record_attempt("j", provider, "succeeded", started_at=now, billed_seconds=5, cost_usd=cost)
        other_process.close()
    code, out = _cli("costs", "--json", url=pg_url)
    assert code == 0, out
    data = json.loads(out)
    assert data["total_usd"] == round(0.0076 + 0.002, 8)
    assert data["by_provider"] == {"modal": 0.002, "runpod": 0.0076}
    assert data["ledger"].startswith("postgresql://") and "schema" in data["ledger"]
    code, table = _cli("costs", url=pg_url)
    assert code == 0 and "runpod" in table and "total" in table


def test_providers_shows_a_circuit_the_fleet_opened_and_a_shared_cooldown(pg_url: str) -> None:  # noqa: F811
    open_store(pg_url).close()
    fleet = PostgresHealth(pg_url)
    try:
        fleet.publish(HealthEvent("opened", "local", until=time.time() + 60, ejections=1))
        fleet.publish(HealthEvent("cooldown", "http", until=time.time() + 30))
    finally:
        fleet.close()
    code, out = _cli("providers", "--json", "--no-probe", url=pg_url)
    assert code == 0, out
    rows = {r["provider"]: r for r in json.loads(out)}
    assert rows["local"]["circuit"] == "open"  # no failure in the ledger: the fleet's view says so
    assert 25 < rows["http"]["cooling_for_s"] <= 30
