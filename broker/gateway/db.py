"""One small async SQL seam for the gateway's own tables, over SQLite (embedded) or PostgreSQL (shared).

Statements are written once with ``?`` placeholders in the SQL both dialects accept (``ON CONFLICT``,
``REAL``/``DOUBLE PRECISION`` via the ``{real}`` slot); the PostgreSQL side rewrites the placeholders.
SQLite calls run in a thread (they take microseconds; a thread keeps the event loop free during a
``BEGIN IMMEDIATE`` wait). PostgreSQL uses a psycopg async pool.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from broker.errors import ConfigurationError

Row = dict[str, Any]

_PLACEHOLDER = re.compile(r"\?")


class Database(ABC):
    dialect: str
    #: the type name for floating-point columns in this dialect
    real: str

    @abstractmethod
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; returns the number of rows it changed."""

    @abstractmethod
    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    @abstractmethod
    async def script(self, statements: Sequence[str]) -> None:
        """Run DDL statements in one transaction (schema setup)."""

    @abstractmethod
    async def close(self) -> None: ...


class SQLiteDatabase(Database):
    dialect = "sqlite"
    real = "REAL"

    def __init__(self, path: str) -> None:
        self.path = path
        if path != ":memory:":
            p = Path(path).expanduser()
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigurationError(f"cannot create the gateway database folder {p.parent}: {exc.strerror}") \
                    from None
            self.path = str(p)
        try:
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise ConfigurationError(f"cannot open the gateway database {self.path}: {exc}") from None
        self._db.row_factory = sqlite3.Row
        if self.path != ":memory:":
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
        self._lock = threading.Lock()

    def _run(self, sql: str, params: Sequence[Any], fetch: bool) -> Any:
        with self._lock:
            cur = self._db.execute(sql, tuple(params))
            if fetch:
                return [dict(r) for r in cur.fetchall()]
            return cur.rowcount

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return int(await asyncio.to_thread(self._run, sql, params, False))

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        rows: list[Row] = await asyncio.to_thread(self._run, sql, params, True)
        return rows

    def _script(self, statements: Sequence[str]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for stmt in statements:
                    self._db.execute(stmt)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    async def script(self, statements: Sequence[str]) -> None:
        await asyncio.to_thread(self._script, statements)

    async def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresDatabase(Database):
    dialect = "postgresql"
    real = "DOUBLE PRECISION"

    def __init__(self, dsn: str, *, min_size: int = 1, max_size: int = 8) -> None:
        try:
            from psycopg.rows import dict_row
            from psycopg_pool import AsyncConnectionPool
        except ImportError:
            raise ConfigurationError("a postgresql:// gateway database needs: pip install 'broker[postgres]'") \
                from None
        self.dsn = dsn
        self._dict_row = dict_row
        self._pool = AsyncConnectionPool(dsn, min_size=min_size, max_size=max_size, open=False,
                                         kwargs={"autocommit": True, "row_factory": dict_row})
        self._opened = False

    async def _open(self) -> Any:
        if not self._opened:
            await self._pool.open(wait=True, timeout=15.0)
            self._opened = True
        return self._pool

    @staticmethod
    def _sql(sql: str) -> str:
        return _PLACEHOLDER.sub("%s", sql.replace("%", "%%"))

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        pool = await self._open()
        async with pool.connection() as conn:
            cur = await conn.execute(self._sql(sql), tuple(params))
            return int(cur.rowcount)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        pool = await self._open()
        async with pool.connection() as conn:
            cur = await conn.execute(self._sql(sql), tuple(params))
            return list(await cur.fetchall())

    async def script(self, statements: Sequence[str]) -> None:
        pool = await self._open()
        async with pool.connection() as conn, conn.transaction():
            # One migrator at a time across replicas: the rest wait, then find the tables there.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('broker.gateway.schema'))")
            for stmt in statements:
                await conn.execute(stmt.replace("%", "%%"))

    async def close(self) -> None:
        if self._opened:
            await self._pool.close()
            self._opened = False


def open_database(url: str) -> Database:
    """``sqlite:///path`` (or a bare path) or ``postgresql://…``."""
    scheme = urlsplit(url).scheme
    if scheme in ("postgresql", "postgres"):
        return PostgresDatabase(url)
    if scheme == "sqlite":
        path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else url[len("sqlite://"):]
        return SQLiteDatabase(path or ":memory:")
    if scheme == "":
        return SQLiteDatabase(url)
    raise ConfigurationError(f"gateway.database_url must be sqlite:///… or postgresql://…, got scheme {scheme!r}")


def is_postgres(url: str) -> bool:
    return urlsplit(url).scheme in ("postgresql", "postgres")
