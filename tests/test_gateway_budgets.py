"""A tenant's own daily budget, held by the ledger's reservations: its jobs stop at the cap, others' do not."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from broker.gateway.db import open_database
from broker.gateway.server import open_tables
from broker.testing.asgi_server import LoopbackServer
from broker.testing.fake import FakeProvider
from tests.gateway_support import SPEECH, fake_manager, gateway_app, wait_state

CAP_USD = 0.03


def test_a_tenants_daily_budget_stops_its_jobs_and_only_its_jobs(tmp_path: Path) -> None:
    async def make_keys() -> tuple[str, str, str]:
        db = open_database(f"sqlite:///{tmp_path / 'gateway.sqlite'}")
        _, keys = await open_tables(db)
        a, alice = await keys.create("alice", daily_budget_usd=CAP_USD)
        b, _ = await keys.create("bob")
        await db.close()
        return a, b, alice.id

    key_a, key_b, alice_id = asyncio.run(make_keys())
    # every job is billed 1 s at $0.01/s, whatever it is quoted: alice's cap holds at most three
    gpu = FakeProvider("gpu", usd_per_second=0.01, billed_seconds=1.0, latency_s=0.01)
    manager = fake_manager(tmp_path, gpu)
    ha, hb = {"Authorization": f"Bearer {key_a}"}, {"Authorization": f"Bearer {key_b}"}
    with LoopbackServer(gateway_app(tmp_path, manager)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        views = []
        for i in range(6):
            job = c.post("/v1/jobs", json={**SPEECH, "input": {"text": f"Line {i}."}}, headers=ha).json()
            views.append(wait_state(c, job["id"], headers=ha))
        ok = [v for v in views if v["state"] == "succeeded"]
        refused = [v for v in views if v["state"] == "failed"]
        assert ok and refused and len(ok) + len(refused) == 6
        assert all(v["error"]["type"] == "BudgetExceeded" and "daily budget" in v["error"]["message"]
                   for v in refused), refused
        calls = len(gpu.jobs)
        assert calls == len(ok)  # a refused job never reached the provider
        # bob has no budget of his own: alice's cap does not touch him
        bob = c.post("/v1/jobs", json=SPEECH, headers=hb).json()
        assert wait_state(c, bob["id"], headers=hb)["state"] == "succeeded"
        costs = c.get("/v1/costs", headers=ha).json()["budget"]["daily"]
        assert costs["cap_usd"] == CAP_USD and costs["used_usd"] <= CAP_USD + 1e-9
        assert c.get("/v1/costs", headers=hb).json()["budget"]["daily"]["cap_usd"] is None
    ledger = manager.ledger
    alice_rows = ledger.attempts(tenant=alice_id)
    assert alice_rows and sum(r["cost_usd"] for r in alice_rows) <= CAP_USD + 1e-9
    assert sum(r["status"] == "succeeded" for r in alice_rows) == len(ok)
    assert ledger.spent(window_s=86400, tenant=alice_id) <= CAP_USD + 1e-9
    manager.close()
