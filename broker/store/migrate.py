"""Versioned schema migrations, shipped in the package and applied on first use.

``broker/store/migrations/<dialect>/NNN_name.sql`` are applied in order, each once, recorded in
``broker_migrations``. Concurrent first use is safe: on PostgreSQL every opener takes a transaction
advisory lock keyed by the schema before looking, so the second waits, then finds nothing to do.
"""

from __future__ import annotations

import re
import time
from importlib import resources
from typing import Any

from broker.errors import ConfigurationError

_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


def migrations(dialect: str) -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every migration packaged for ``dialect``, in order."""
    folder = resources.files("broker.store.migrations").joinpath(dialect)
    out = []
    for entry in folder.iterdir():
        m = _NAME.match(entry.name)
        if m:
            out.append((int(m.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    out.sort()
    versions = [v for v, _, _ in out]
    if versions != list(range(1, len(versions) + 1)):
        raise RuntimeError(f"broken migration numbering for {dialect}: {versions}")
    return out


def migrate_postgres(conn: Any) -> list[int]:
    """Bring the connection's current schema up to date; returns the versions applied now."""
    steps = migrations("postgresql")
    applied: list[int] = []
    with conn.transaction():
        # Keyed by schema: tests (and tenants) in separate schemas of one database do not wait on each other.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('broker-migrations:' || current_schema()))")
        conn.execute("CREATE TABLE IF NOT EXISTS broker_migrations (version INTEGER PRIMARY KEY, "
                     "name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)")
        done = {row[0] for row in conn.execute("SELECT version FROM broker_migrations").fetchall()}
        newest = max(done, default=0)
        if newest > len(steps):
            raise ConfigurationError(f"the store's schema is at version {newest}; this broker knows up to "
                                     f"{len(steps)} (upgrade broker)")
        for version, name, sql in steps:
            if version in done:
                continue
            conn.execute(sql)
            conn.execute("INSERT INTO broker_migrations VALUES (%s, %s, %s)", (version, name, time.time()))
            applied.append(version)
    return applied
