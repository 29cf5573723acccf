"""The long-work journal on both backends: a book stopped by its budget resumes on the same store without
paying twice (PostgreSQL: from any machine), and `broker jobs` lists it from the shared store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.cli import app
from broker.errors import BudgetStopped
from broker.longform import LongJob
from broker.longform.journal import open_journal
from broker.routing.manager import CloudGPUManager
from broker.settings import Settings
from broker.store import open_store
from broker.testing.fake import FakeProvider, fake_catalog
from tests.store_support import pg_url, store_url  # noqa: F401  (fixtures)
from tests.test_longform import book, distinct


def _manager(url: str, *providers: FakeProvider) -> CloudGPUManager:
    s = Settings()
    s.ledger.url = url
    s.manager.fallback_local = False
    s.manager.backoff_initial_s = s.manager.backoff_jitter_s = 0.0
    return CloudGPUManager(list(providers), settings=s, catalog=fake_catalog(*providers))


async def test_a_book_stopped_by_its_budget_resumes_on_the_store_without_paying_twice(
        store_url: str, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "book.m4b"
    chapters = book(2, 10)
    first = _manager(store_url, a := FakeProvider("a", usd_per_second=1.0, billed_seconds=1.0, max_concurrency=1,
                                                  make=distinct))
    job = LongJob(first, chapters, output=out, max_usd=3.0, target_run_s=0.4, workers=1)
    total = len(job.pieces)
    with pytest.raises(BudgetStopped, match="resume"):
        await job.run()
    ran_first = a.submits
    assert 2 <= ran_first < total
    job.close()
    first.close()
    # another process (on PostgreSQL: another machine) picks the book up from the same store
    second = _manager(store_url, b := FakeProvider("a", usd_per_second=1.0, billed_seconds=1.0, make=distinct))
    job2 = LongJob(second, chapters, output=out, max_usd=100.0, target_run_s=0.4)
    result = await job2.run()
    assert (result.pieces_reused, result.pieces_run) == (ran_first, total - ran_first)
    assert b.submits == total - ran_first and out.is_file()
    job2.close()
    second.close()
    ledger = open_store(store_url)
    try:
        assert len([r for r in ledger.attempts() if r["status"] == "succeeded"]) == total  # each piece paid once
    finally:
        ledger.close()
    journal = open_journal(Settings(ledger={"url": store_url}))
    try:
        (row,) = journal.jobs()
        assert row["status"] == "done" and row["pieces_done"] == row["pieces"] == total
        assert row["cost_usd"] == pytest.approx(total)
    finally:
        journal.close()


def test_broker_jobs_lists_long_jobs_from_the_shared_store(pg_url: str, tmp_path: Path) -> None:  # noqa: F811
    m = _manager(pg_url, FakeProvider("a", usd_per_second=0.5, billed_seconds=1.0, make=distinct))
    r = m.speak_long(book(2, 6), output=tmp_path / "b.wav", target_run_s=0.4)
    m.close()
    res = CliRunner().invoke(app, ["jobs", "--json"], env={"COLUMNS": "200", "BROKER_LEDGER__URL": pg_url})
    assert res.exit_code == 0, res.stdout
    (row,) = json.loads(res.stdout)["jobs"]
    assert row["status"] == "done" and row["pieces_done"] == row["pieces"] == r.pieces
    assert row["cost_usd"] == pytest.approx(r.cost_usd)
