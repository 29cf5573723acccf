"""A fresh PostgreSQL schema per test (on the machine's real server), and the same for SQLite.

PostgreSQL runs at 127.0.0.1:5432 on every development machine and in CI (``.ci/run`` starts it). A test
that needs it fails when it is unreachable under ``CI=true`` and skips elsewhere with the reason.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ADMIN_URL = os.environ.get("BROKER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _unavailable(why: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL is required in CI: {why}")
    pytest.skip(f"PostgreSQL not reachable: {why}")


def admin_connection():  # type: ignore[no-untyped-def]
    try:
        import psycopg
    except ImportError as exc:
        _unavailable(f"psycopg is not installed ({exc})")
        raise
    try:
        return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        _unavailable(str(exc).strip())
        raise


def fresh_pg_url() -> Iterator[str]:
    """Yield a store URL on a schema of its own; drop the schema afterwards."""
    conn = admin_connection()
    schema = f"broker_test_{uuid.uuid4().hex[:12]}"
    try:
        yield f"{ADMIN_URL}?schema={schema}"
    finally:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        conn.close()


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from fresh_pg_url()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each backend in turn: a fresh SQLite file, a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    else:
        yield from fresh_pg_url()
