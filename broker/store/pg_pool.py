"""A pool of PostgreSQL connections on a store URL's schema, created and migrated on first use."""

from __future__ import annotations

import os
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from broker.errors import ConfigurationError
from broker.store.migrate import migrate_postgres
from broker.store.url import StoreURL


def open_pool(url: StoreURL, *, max_size: int = 4, timeout_s: float = 10.0) -> ConnectionPool:
    """A pool of autocommit connections on ``url``'s schema, migrated; errors never show the password."""
    schema = url.schema

    def configure(conn: psycopg.Connection[Any]) -> None:
        # The durability the SQLite ledger has (WAL, synchronous=NORMAL): a commit is visible to every
        # process at once and survives any client crash; only a crash of the database server itself may
        # lose the last few hundred milliseconds. It saves an fsync (~1-8 ms here) per reservation.
        conn.execute("SET synchronous_commit TO off")
        if schema:
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))

    kwargs: dict[str, Any] = {"autocommit": True}
    if "application_name" not in conninfo_to_dict(url.dsn):
        # pg_stat_activity then says which broker process holds each connection (and when it is gone)
        kwargs["application_name"] = f"broker:{os.getpid()}"
    pool: ConnectionPool = ConnectionPool(url.dsn, min_size=1, max_size=max_size, open=False, timeout=timeout_s,
                                          kwargs=kwargs, configure=configure,
                                          name="broker-store")
    try:
        pool.open(wait=True, timeout=timeout_s)
        with pool.connection() as conn:
            if schema:
                try:
                    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
                except pg_errors.UniqueViolation:
                    pass  # another process created it this instant
            migrate_postgres(conn)
    except PoolTimeout:
        pool.close()
        raise ConfigurationError(f"cannot reach the store {url} within {timeout_s:g} s") from None
    except psycopg.Error as exc:
        pool.close()
        raise ConfigurationError(f"cannot open the store {url}: {url.redact(str(exc))}") from None
    return pool
