"""A fresh database on the machine's real PostgreSQL for one test (dropped afterwards).

PostgreSQL must answer at 127.0.0.1:5432 (``BROKER_TEST_PG`` overrides the server URL): a test that needs it
fails, not skips, when it does not — CI starts the server before the suite.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

SERVER = os.environ.get("BROKER_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


@contextmanager
def pg_database(prefix: str = "broker_t") -> Iterator[str]:
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{SERVER}/{name}"
    finally:
        with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
