"""Storage: one interface (``base.LedgerStore``, ``base.SharedHealth``), two backends.

``open_store(settings_or_url)`` is how the manager and the CLI get the ledger: SQLite by default
(``ledger.path``, embedded, no server), PostgreSQL when ``ledger.url = "postgresql://…"`` — then
budgets, the ledger and endpoint health are shared by every process on that database. Backends
import their drivers on first use: ``import broker`` never loads psycopg.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from broker.errors import ConfigurationError
from broker.store.base import BudgetFull, HealthEvent, LedgerBusy, LedgerStore, SharedHealth, SpendLimit
from broker.store.url import StoreURL, redact

if TYPE_CHECKING:
    from broker.settings import Settings

_PG_HINT = "the PostgreSQL store needs psycopg: pip install 'broker[postgres]'"


def store_url(settings_or_url: Settings | StoreURL | str) -> StoreURL:
    """The store a configuration points at: ``ledger.url``, else the SQLite file at ``ledger.path``."""
    if isinstance(settings_or_url, StoreURL):
        return settings_or_url
    if isinstance(settings_or_url, str):
        return StoreURL.parse(settings_or_url)
    ledger = settings_or_url.ledger
    if ledger.url:
        return StoreURL.parse(ledger.url)
    return StoreURL("sqlite", ledger.path)


def open_store(settings_or_url: Settings | StoreURL | str, **options: Any) -> LedgerStore:
    """Open (creating and migrating on first use) the ledger the configuration names."""
    url = store_url(settings_or_url)
    if not isinstance(settings_or_url, (str, StoreURL)):
        cfg = settings_or_url.ledger
        if url.dialect == "postgresql":
            options = {"heartbeat_s": cfg.heartbeat_s, "owner_timeout_s": cfg.owner_timeout_s, **options}
    if url.dialect == "sqlite":
        from broker.money.ledger import Ledger  # the embedded backend (its schema lives with it)

        return Ledger(url.dsn, **options)
    try:
        from broker.store.postgres import PostgresLedger
    except ImportError:
        raise ConfigurationError(_PG_HINT) from None
    return PostgresLedger(url, **options)


def flush_all() -> None:
    """Write what every open ledger of this process still holds in memory (on SIGTERM, and at exit)."""
    import sys

    from broker.money.ledger import flush_all as flush_sqlite

    flush_sqlite()
    postgres = sys.modules.get("broker.store.postgres")
    if postgres is not None:
        postgres.flush_all()


def open_shared_health(settings_or_url: Settings | StoreURL | str) -> SharedHealth | None:
    """Fleet-wide endpoint health on the same database as the ledger; None (in-process only) on SQLite."""
    url = store_url(settings_or_url)
    if url.dialect != "postgresql":
        return None
    if not isinstance(settings_or_url, (str, StoreURL)) and not settings_or_url.ledger.shared_health:
        return None
    try:
        from broker.store.pg_health import PostgresHealth
    except ImportError:
        raise ConfigurationError(_PG_HINT) from None
    return PostgresHealth(url)


__all__ = ["BudgetFull", "HealthEvent", "LedgerBusy", "LedgerStore", "SharedHealth", "SpendLimit", "StoreURL",
           "flush_all", "open_shared_health", "open_store", "redact", "store_url"]
