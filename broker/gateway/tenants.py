"""API keys: each one a tenant that sees only its own jobs, with its own daily/monthly dollar budgets (held by
the ledger's reservations, like the manager's) and a rate limit. Only a key's SHA-256 is stored.

Keys are 32 random bytes (``bk_`` + urlsafe base64), so a plain hash is enough: there is nothing to
brute-force the way there is with a password. The key is shown once, when it is created.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

from broker.gateway.db import Database, Row
from broker.money.budget import TenantBudget

KEY_PREFIX = "bk_"
#: the tenant of every job when the gateway runs without keys (loopback, single user)
OPEN_TENANT = "local"


def schema(db: Database) -> list[str]:
    r = db.real
    return [
        f"""CREATE TABLE IF NOT EXISTS gateway_keys (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            key_hash TEXT NOT NULL UNIQUE,
            hint TEXT NOT NULL,
            daily_budget_usd {r},
            monthly_budget_usd {r},
            rate_per_minute INTEGER,
            webhook_secret TEXT,
            created_at {r} NOT NULL,
            revoked_at {r}
        )""",
    ]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    daily_budget_usd: float | None = None
    monthly_budget_usd: float | None = None
    rate_per_minute: int | None = None
    webhook_secret: str | None = None

    def __repr__(self) -> str:  # the webhook secret never prints
        return f"Tenant({self.id!r}, {self.name!r})"

    @classmethod
    def from_row(cls, row: Row) -> Tenant:
        return cls(row["id"], row["name"], row["daily_budget_usd"], row["monthly_budget_usd"],
                   row["rate_per_minute"], row["webhook_secret"])

    def budget(self) -> TenantBudget:
        """What the manager enforces for this tenant's jobs (its attempts are marked with its id)."""
        return TenantBudget(self.id, self.daily_budget_usd, self.monthly_budget_usd)

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "daily_budget_usd": self.daily_budget_usd,
                "monthly_budget_usd": self.monthly_budget_usd, "rate_per_minute": self.rate_per_minute}


class KeyStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._cache: dict[str, tuple[float, Tenant | None]] = {}

    async def setup(self) -> None:
        await self.db.script(schema(self.db))

    async def create(self, name: str, *, daily_budget_usd: float | None = None,
                     monthly_budget_usd: float | None = None, rate_per_minute: int | None = None
                     ) -> tuple[str, Tenant]:
        """A new key (returned once, never stored) and its tenant."""
        for what, v in (("daily_budget_usd", daily_budget_usd), ("monthly_budget_usd", monthly_budget_usd)):
            if v is not None and not v > 0:
                raise ValueError(f"{what} must be a positive number of dollars")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        tenant_id = "t_" + secrets.token_hex(6)
        webhook_secret = "whsec_" + secrets.token_urlsafe(24)
        await self.db.execute(
            "INSERT INTO gateway_keys (id, name, key_hash, hint, daily_budget_usd, monthly_budget_usd,"
            " rate_per_minute, webhook_secret, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (tenant_id, name, hash_key(key), key[:7] + "…", daily_budget_usd, monthly_budget_usd,
             rate_per_minute, webhook_secret, time.time()))
        return key, Tenant(tenant_id, name, daily_budget_usd, monthly_budget_usd, rate_per_minute, webhook_secret)

    async def verify(self, key: str) -> Tenant | None:
        """The tenant of ``key``, or None. Cached for a few seconds (a revoke takes effect within that)."""
        digest = hash_key(key)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        row = await self.db.fetchone("SELECT * FROM gateway_keys WHERE key_hash = ? AND revoked_at IS NULL",
                                     (digest,))
        tenant = None
        if row is not None and hmac.compare_digest(row["key_hash"], digest):
            tenant = Tenant.from_row(row)
        self._cache[digest] = (now + 5.0, tenant)
        return tenant

    async def get(self, tenant_id: str) -> Tenant | None:
        row = await self.db.fetchone("SELECT * FROM gateway_keys WHERE id = ?", (tenant_id,))
        return None if row is None else Tenant.from_row(row)

    async def any_keys(self) -> bool:
        row = await self.db.fetchone("SELECT COUNT(*) AS n FROM gateway_keys WHERE revoked_at IS NULL")
        return bool(row and row["n"])

    async def list_keys(self) -> list[dict[str, Any]]:
        rows = await self.db.fetchall("SELECT id, name, hint, daily_budget_usd, monthly_budget_usd, rate_per_minute,"
                                      " created_at, revoked_at FROM gateway_keys ORDER BY created_at")
        return rows

    async def revoke(self, tenant_id: str) -> bool:
        changed = await self.db.execute("UPDATE gateway_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                                        (time.time(), tenant_id))
        self._cache.clear()
        return bool(changed)
