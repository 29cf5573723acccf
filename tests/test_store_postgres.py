"""PostgreSQL specifics: migrations under concurrent first use, owners' heartbeats, URLs that keep secrets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

from broker.errors import ConfigurationError
from broker.settings import Settings
from broker.store import SpendLimit, StoreURL, open_store, store_url
from broker.store.migrate import migrate_postgres, migrations
from tests.store_support import pg_url  # noqa: F401  (fixture)

DAY = 86400.0


def _wait_for(check: Callable[[], bool], timeout_s: float) -> float:
    """Poll ``check`` (a database read) until true; returns the seconds it took. Fails past ``timeout_s``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not true within {timeout_s} s")
        time.sleep(0.02)
    return time.monotonic() - start


def test_migrations_run_twice_and_concurrently_without_error(pg_url: str) -> None:  # noqa: F811
    import psycopg

    url = StoreURL.parse(pg_url)
    admin = psycopg.connect(url.dsn, autocommit=True)
    admin.execute(f'CREATE SCHEMA "{url.schema}"')
    applied: list[list[int]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def first_use() -> None:
        try:
            with psycopg.connect(url.dsn, autocommit=True) as conn:
                conn.execute(f'SET search_path TO "{url.schema}"')
                barrier.wait(timeout=10)
                applied.append(migrate_postgres(conn))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=first_use) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    everything = list(range(1, len(migrations("postgresql")) + 1))
    assert sorted(applied) == [[]] * 5 + [everything]  # exactly one opener applied them, the rest waited
    # a second run (and the stores opened on it) find nothing to do
    for _ in range(2):
        open_store(pg_url).close()
    admin.execute(f'SET search_path TO "{url.schema}"')
    assert [r[0] for r in admin.execute("SELECT version FROM broker_migrations ORDER BY version")] == everything
    admin.close()


def test_a_schema_newer_than_this_broker_is_refused(pg_url: str) -> None:  # noqa: F811
    open_store(pg_url).close()
    import psycopg

    url = StoreURL.parse(pg_url)
    with psycopg.connect(url.dsn, autocommit=True) as conn:
        conn.execute(f'INSERT INTO "{url.schema}".broker_migrations VALUES (999, \'999_future.sql\', 0)')
    with pytest.raises(ConfigurationError, match="version 999"):
        open_store(pg_url)


_HOLDER = r"""
import sys, time
from broker.store import open_store, SpendLimit
ledger = open_store(sys.argv[1], heartbeat_s=0.1, owner_timeout_s=1.0)
ledger.open_attempt("held", "gpu", reserved_usd=0.6, limits=[SpendLimit("daily", 1.0, window_s=86400)],
                    expires_at=time.time() + 3600)
print("reserved", flush=True)
time.sleep(600)
"""


def test_a_dead_owners_reservation_is_released_within_the_heartbeat_window(pg_url: str) -> None:  # noqa: F811
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, pg_url], stdout=subprocess.PIPE, text=True)
    ledger = open_store(pg_url, heartbeat_s=0.1, owner_timeout_s=1.0)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "reserved"
        daily = SpendLimit("daily", 1.0, window_s=DAY)
        assert ledger.spent(window_s=DAY) == pytest.approx(0.6)  # alive: its reservation holds the budget
        with pytest.raises(Exception, match="daily"):
            ledger.open_attempt("mine", "gpu", reserved_usd=0.6, limits=[daily])
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        killed_at = time.monotonic()
        # its reservation stops counting once its heartbeat is stale, and a live process marks it orphaned
        _wait_for(lambda: ledger.spent(window_s=DAY) == 0.0, timeout_s=3.0)
        _wait_for(lambda: [r["status"] for r in ledger.attempts()] == ["lost"], timeout_s=3.0)
        assert time.monotonic() - killed_at <= 1.0 + 3 * 0.1 + 1.0  # the window, two beats, slack for 2 cores
        (row,) = ledger.attempts()
        assert "stopped beating" in row["message"] and row["cost_usd"] == 0
        assert row["owner"].split(":")[1] == str(holder.pid)
        ledger.open_attempt("mine", "gpu", reserved_usd=0.6, limits=[daily])
    finally:
        if holder.poll() is None:
            holder.kill()
        ledger.close()


def test_a_live_owner_keeps_its_reservation_however_long_the_job(pg_url: str) -> None:  # noqa: F811
    ledger = open_store(pg_url, heartbeat_s=0.05, owner_timeout_s=0.3)
    try:
        ledger.open_attempt("long", "gpu", reserved_usd=0.5, limits=[SpendLimit("daily", 1.0, window_s=DAY)])
        beats = ledger.attempts()[0]["owner"]
        start = time.monotonic()
        _wait_for(lambda: time.monotonic() - start > 0.6, timeout_s=2.0)  # two owner timeouts pass
        assert ledger.spent(window_s=DAY) == pytest.approx(0.5)
        assert [r["status"] for r in ledger.attempts()] == ["reserved"] and beats
    finally:
        ledger.close()


def test_urls_pick_the_backend_and_never_show_the_password(tmp_path: object) -> None:
    assert StoreURL.parse("sqlite:///rel/ledger.db").dsn == "rel/ledger.db"
    assert StoreURL.parse("sqlite:////abs/ledger.db").dsn == "/abs/ledger.db"
    assert StoreURL.parse("sqlite://").dsn == ":memory:"
    pg = StoreURL.parse("postgresql://app:s3cret@db.internal:5432/broker?schema=team_a&sslmode=require")
    assert pg.schema == "team_a" and "schema" not in pg.dsn and "sslmode=require" in pg.dsn
    assert "s3cret" not in str(pg) and "***" in str(pg)
    with pytest.raises(ConfigurationError, match="plain identifier"):
        StoreURL.parse("postgresql://h/db?schema=a;drop")
    with pytest.raises(ConfigurationError) as err:
        StoreURL.parse("mysql://root:hunter2@h/db")
    assert "hunter2" not in str(err.value)
    s = Settings()
    s.ledger.path = "/tmp/x.sqlite"
    assert store_url(s) == StoreURL("sqlite", "/tmp/x.sqlite")
    s.ledger.url = "postgresql://postgres@127.0.0.1/test"
    assert store_url(s).dialect == "postgresql"


def test_an_unreachable_database_is_a_configuration_error_without_the_password() -> None:
    with pytest.raises(ConfigurationError) as err:
        open_store("postgresql://app:s3cret@127.0.0.1:1/none", connect_timeout_s=2.0)
    assert "s3cret" not in str(err.value) and "127.0.0.1" in str(err.value)


def test_import_broker_does_not_load_a_database_driver() -> None:
    code = ("import sys, broker, broker.store, broker.routing.manager, broker.settings; "
            "assert 'psycopg' not in sys.modules and 'psycopg_pool' not in sys.modules, 'driver imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


_RUNNER = r"""
import sys, time
from broker.store import open_store, SpendLimit
ledger = open_store(sys.argv[1], heartbeat_s=0.1, owner_timeout_s=1.0)
aid, _ = ledger.open_attempt("job", "runpod", reserved_usd=0.6, limits=[SpendLimit("daily", 1.0, window_s=86400)],
                             expires_at=time.time() + 3600)
ledger.started(aid, "rp-123")  # write-ahead: the provider has the job; it may bill from here on
print("started", flush=True)
time.sleep(600)
"""


def test_a_dead_owners_provider_job_keeps_its_reservation_until_reconciled(pg_url: str) -> None:  # noqa: F811
    runner = subprocess.Popen([sys.executable, "-c", _RUNNER, pg_url], stdout=subprocess.PIPE, text=True)
    ledger = open_store(pg_url, heartbeat_s=0.1, owner_timeout_s=1.0)
    try:
        assert runner.stdout is not None and runner.stdout.readline().strip() == "started"
        (row,) = ledger.attempts()
        assert row["status"] == "running" and row["provider_job_id"] == "rp-123" and row["owner_pid"] == runner.pid
        assert ledger.orphans(stale_s=60, alive=lambda pid: True) == []  # alive and beating
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait(timeout=10)
        # the same host sees the pid is dead at once; the job may still be running at RunPod, so it holds
        (orphan,) = ledger.orphans(stale_s=60, alive=lambda pid: pid != runner.pid)
        assert orphan["provider_job_id"] == "rp-123"
        start = time.monotonic()
        _wait_for(lambda: time.monotonic() - start > 1.5, timeout_s=3.0)  # past the owner timeout
        assert ledger.spent(window_s=DAY) == pytest.approx(0.6)  # still reserved: not released blindly
        assert [r["status"] for r in ledger.attempts()] == ["running"]
        # another machine (no pid check possible) finds it by its stale heartbeat, and one claimant wins
        assert [r["id"] for r in ledger.orphans(stale_s=1.0, alive=lambda pid: True)] == [orphan["id"]]
        other = open_store(pg_url)
        try:
            assert ledger.claim(orphan) is True
            assert other.claim(orphan) is False
        finally:
            other.close()
        assert ledger.orphans(stale_s=1.0, alive=lambda pid: True) == []  # ours now
        ledger.mark_cancelling(orphan["id"], provider_job_id=None, expires_at=time.time() + 60, message="cancel sent")
        assert ledger.attempts()[0]["status"] == "cancelling" and ledger.spent(window_s=DAY) == pytest.approx(0.6)
        ledger.close_attempt(orphan["id"], "cancelled", billed_seconds=7.0, cost_usd=0.05, cost_estimated=False)
        assert ledger.spent(window_s=DAY) == pytest.approx(0.05)  # settled from the provider's bill: released
        assert ledger.heartbeat() == 0
    finally:
        if runner.poll() is None:
            runner.kill()
        ledger.close()


def test_a_full_budget_says_whether_waiting_could_help(pg_url: str) -> None:  # noqa: F811
    from broker.store import BudgetFull

    ledger = open_store(pg_url)
    try:
        daily = SpendLimit("daily", 1.0, window_s=DAY)
        aid, _ = ledger.open_attempt("a", "p", reserved_usd=0.9, limits=[daily])
        with pytest.raises(BudgetFull) as full:
            ledger.open_attempt("b", "p", reserved_usd=0.5, limits=[daily])
        assert full.value.waitable  # only a reservation is in the way: it may settle lower
        ledger.close_attempt(aid, "succeeded", cost_usd=0.8)
        with pytest.raises(BudgetFull) as full:
            ledger.open_attempt("b", "p", reserved_usd=0.5, limits=[daily])
        assert not full.value.waitable  # settled spend alone leaves no room
        ledger.record_attempt("c", "p", "failed", started_at=time.time(), unpriced=True)
        assert ledger.attempts(job_id="c")[0]["unpriced"] == 1
    finally:
        ledger.close()
