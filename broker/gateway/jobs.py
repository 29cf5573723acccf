"""The gateway's job table: one row per accepted job, shared by every replica on the same database.

A row is created when ``POST /v1/jobs`` accepts a job (state ``queued``), claimed by the replica that runs
it (a lease with an owner and an expiry, so a replica killed mid-job loses the claim and another picks the
job up), given its output the moment the provider has returned it (``keep_output``, so a job whose replica
dies after that is finished by the next one, not run and billed again), and finished with its cost and
attempts. ``Idempotency-Key`` is unique per tenant: the same key with the same body returns the first job;
with a different body it is refused.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from broker.gateway.db import Database, Row

TERMINAL = ("succeeded", "failed", "cancelled", "lost")
STATES = ("queued", "running", *TERMINAL)


def schema(db: Database) -> list[str]:
    r = db.real
    return [
        f"""CREATE TABLE IF NOT EXISTS gateway_jobs (
            id TEXT PRIMARY KEY,
            tenant TEXT NOT NULL,
            kind TEXT NOT NULL,
            state TEXT NOT NULL,
            request TEXT NOT NULL,
            body_hash TEXT NOT NULL,
            idempotency_key TEXT,
            webhook_url TEXT,
            webhook_state TEXT,
            webhook_until {r},
            created_at {r} NOT NULL,
            updated_at {r} NOT NULL,
            started_at {r},
            finished_at {r},
            progress {r} NOT NULL DEFAULT 0,
            cost_usd {r} NOT NULL DEFAULT 0,
            provider TEXT,
            attempts TEXT,
            error TEXT,
            output_key TEXT,
            output_mime TEXT,
            output_bytes INTEGER,
            lease_owner TEXT,
            lease_until {r},
            runs INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE UNIQUE INDEX IF NOT EXISTS gateway_jobs_idem ON gateway_jobs (tenant, idempotency_key)",
        "CREATE INDEX IF NOT EXISTS gateway_jobs_tenant_created ON gateway_jobs (tenant, created_at)",
        "CREATE INDEX IF NOT EXISTS gateway_jobs_state ON gateway_jobs (state)",
    ]


@dataclass
class JobRow:
    id: str
    tenant: str
    kind: str
    state: str
    request: dict[str, Any]
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    progress: float = 0.0
    cost_usd: float = 0.0
    provider: str | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    output_key: str | None = None
    output_mime: str | None = None
    output_bytes: int | None = None
    webhook_url: str | None = None
    webhook_state: str | None = None
    idempotency_key: str | None = None
    body_hash: str = ""
    runs: int = 0

    @classmethod
    def from_row(cls, row: Row) -> JobRow:
        return cls(
            id=row["id"], tenant=row["tenant"], kind=row["kind"], state=row["state"],
            request=json.loads(row["request"]), created_at=row["created_at"], updated_at=row["updated_at"],
            started_at=row["started_at"], finished_at=row["finished_at"], progress=row["progress"] or 0.0,
            cost_usd=row["cost_usd"] or 0.0, provider=row["provider"],
            attempts=json.loads(row["attempts"]) if row["attempts"] else [],
            error=json.loads(row["error"]) if row["error"] else None, output_key=row["output_key"],
            output_mime=row["output_mime"], output_bytes=row["output_bytes"], webhook_url=row["webhook_url"],
            webhook_state=row["webhook_state"], idempotency_key=row["idempotency_key"],
            body_hash=row["body_hash"], runs=row["runs"] or 0,
        )

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def view(self) -> dict[str, Any]:
        """What ``GET /v1/jobs/{id}`` shows (never the request's media)."""
        return {
            "id": self.id, "kind": self.kind, "state": self.state, "progress": round(self.progress, 4),
            "cost_usd": round(self.cost_usd, 8), "provider": self.provider, "attempts": self.attempts,
            "error": self.error, "created_at": self.created_at, "started_at": self.started_at,
            "finished_at": self.finished_at,
            # a running job's kept output is shown once the job has been recorded as succeeded
            "output": None if self.output_key is None or self.state != "succeeded" else {
                "url": f"/v1/jobs/{self.id}/output", "mime": self.output_mime, "bytes": self.output_bytes},
        }


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different body."""


class JobStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def setup(self) -> None:
        await self.db.script(schema(self.db))

    async def create(self, *, tenant: str, kind: str, request: dict[str, Any], body_hash: str,
                     idempotency_key: str | None, webhook_url: str | None) -> tuple[JobRow, bool]:
        """Insert a queued job; returns (job, created). An idempotent replay returns the first job."""
        if idempotency_key is not None:
            first = await self._by_key(tenant, idempotency_key)
            if first is not None:
                if first.body_hash != body_hash:
                    raise IdempotencyConflict(idempotency_key)
                return first, False
        now = time.time()
        job_id = uuid.uuid4().hex
        changed = await self.db.execute(
            "INSERT INTO gateway_jobs (id, tenant, kind, state, request, body_hash, idempotency_key, webhook_url,"
            " webhook_state, created_at, updated_at) VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT DO NOTHING",
            (job_id, tenant, kind, json.dumps(request), body_hash, idempotency_key, webhook_url,
             "pending" if webhook_url else None, now, now))
        if not changed:  # another request with the same key won the race
            first = await self._by_key(tenant, idempotency_key or "")
            assert first is not None
            if first.body_hash != body_hash:
                raise IdempotencyConflict(idempotency_key or "")
            return first, False
        job = await self.get(job_id)
        assert job is not None
        return job, True

    async def _by_key(self, tenant: str, key: str) -> JobRow | None:
        row = await self.db.fetchone("SELECT * FROM gateway_jobs WHERE tenant = ? AND idempotency_key = ?",
                                     (tenant, key))
        return None if row is None else JobRow.from_row(row)

    async def get(self, job_id: str, tenant: str | None = None) -> JobRow | None:
        if tenant is None:
            row = await self.db.fetchone("SELECT * FROM gateway_jobs WHERE id = ?", (job_id,))
        else:
            row = await self.db.fetchone("SELECT * FROM gateway_jobs WHERE id = ? AND tenant = ?", (job_id, tenant))
        return None if row is None else JobRow.from_row(row)

    async def list_jobs(self, *, tenant: str | None, state: str | None = None, since: float | None = None,
                   until: float | None = None, cursor: str | None = None, limit: int = 50) -> list[JobRow]:
        """Newest first; ``cursor`` is the last id of the previous page (``created_at``, then id, order)."""
        where: list[str] = ["1 = 1"]
        params: list[Any] = []
        if tenant is not None:
            where.append("tenant = ?")
            params.append(tenant)
        if state is not None:
            where.append("state = ?")
            params.append(state)
        if since is not None:
            where.append("created_at >= ?")
            params.append(since)
        if until is not None:
            where.append("created_at < ?")
            params.append(until)
        if cursor is not None:
            anchor = await self.db.fetchone("SELECT created_at FROM gateway_jobs WHERE id = ?", (cursor,))
            if anchor is not None:
                where.append("(created_at < ? OR (created_at = ? AND id < ?))")
                params += [anchor["created_at"], anchor["created_at"], cursor]
        rows = await self.db.fetchall(
            f"SELECT * FROM gateway_jobs WHERE {' AND '.join(where)} ORDER BY created_at DESC, id DESC LIMIT ?",
            (*params, limit))
        return [JobRow.from_row(r) for r in rows]

    async def claim(self, job_id: str, owner: str, lease_s: float) -> JobRow | None:
        """Take the job to run it: queued, or running under a lease that has expired (its replica died)."""
        now = time.time()
        changed = await self.db.execute(
            "UPDATE gateway_jobs SET state = 'running', lease_owner = ?, lease_until = ?, updated_at = ?,"
            " started_at = COALESCE(started_at, ?), runs = runs + 1"
            " WHERE id = ? AND (state = 'queued' OR (state = 'running' AND (lease_until IS NULL OR lease_until < ?)))",
            (owner, now + lease_s, now, now, job_id, now))
        return await self.get(job_id) if changed else None

    async def renew(self, job_id: str, owner: str, lease_s: float, progress: float | None = None) -> bool:
        now = time.time()
        if progress is None:
            changed = await self.db.execute(
                "UPDATE gateway_jobs SET lease_until = ?, updated_at = ? WHERE id = ? AND lease_owner = ?"
                " AND state = 'running'", (now + lease_s, now, job_id, owner))
        else:
            changed = await self.db.execute(
                "UPDATE gateway_jobs SET lease_until = ?, updated_at = ?, progress = ? WHERE id = ?"
                " AND lease_owner = ? AND state = 'running'", (now + lease_s, now, progress, job_id, owner))
        return bool(changed)

    async def keep_output(self, job_id: str, owner: str, *, output_key: str, output_mime: str,
                          output_bytes: int) -> bool:
        """Record a running job's stored output the moment it exists, before the ledger settles the attempt
        that made it: a replica that claims the job after this one died finishes it from here instead of
        running (and paying for) it again. Only while this replica holds the job."""
        changed = await self.db.execute(
            "UPDATE gateway_jobs SET output_key = ?, output_mime = ?, output_bytes = ?, updated_at = ?"
            " WHERE id = ? AND lease_owner = ? AND state = 'running'",
            (output_key, output_mime, output_bytes, time.time(), job_id, owner))
        return bool(changed)

    async def finish(self, job_id: str, owner: str, *, state: str, cost_usd: float, provider: str | None,
                     attempts: list[dict[str, Any]], error: dict[str, Any] | None = None,
                     output_key: str | None = None, output_mime: str | None = None,
                     output_bytes: int | None = None) -> bool:
        """Record the outcome, only if this replica still holds the job (a cancel may have ended it)."""
        now = time.time()
        changed = await self.db.execute(
            "UPDATE gateway_jobs SET state = ?, cost_usd = ?, provider = ?, attempts = ?, error = ?, output_key = ?,"
            " output_mime = ?, output_bytes = ?, finished_at = ?, updated_at = ?,"
            " progress = CASE WHEN ? THEN 1.0 ELSE progress END,"  # a failed job keeps how far it got
            " lease_owner = NULL, lease_until = NULL WHERE id = ? AND lease_owner = ? AND state = 'running'",
            (state, cost_usd, provider, json.dumps(attempts), json.dumps(error) if error else None, output_key,
             output_mime, output_bytes, now, now, state == "succeeded", job_id, owner))
        return bool(changed)

    async def cancel(self, job_id: str, tenant: str | None) -> JobRow | None:
        """Mark a job cancelled (whoever runs it sees the state change and stops)."""
        now = time.time()
        params: tuple[Any, ...] = (now, now, job_id)
        extra = ""
        if tenant is not None:
            extra, params = " AND tenant = ?", (*params, tenant)
        await self.db.execute(
            "UPDATE gateway_jobs SET state = 'cancelled', finished_at = ?, updated_at = ?, lease_owner = NULL,"
            f" lease_until = NULL WHERE id = ? AND state IN ('queued', 'running'){extra}", params)
        return await self.get(job_id, tenant)

    async def drop_output(self, job_id: str) -> None:
        await self.db.execute("UPDATE gateway_jobs SET output_key = NULL, output_bytes = NULL WHERE id = ?",
                              (job_id,))

    async def claim_webhook(self, job_id: str, hold_s: float) -> bool:
        """Take the job's webhook to send it: pending, or held by a sender that died (its hold lapsed)."""
        now = time.time()
        changed = await self.db.execute(
            "UPDATE gateway_jobs SET webhook_state = 'sending', webhook_until = ? WHERE id = ?"
            " AND (webhook_state = 'pending' OR (webhook_state = 'sending' AND webhook_until < ?))",
            (now + hold_s, job_id, now))
        return bool(changed)

    async def hold_webhook(self, job_id: str, hold_s: float) -> None:
        await self.db.execute("UPDATE gateway_jobs SET webhook_until = ? WHERE id = ? AND webhook_state = 'sending'",
                              (time.time() + hold_s, job_id))

    async def set_webhook_state(self, job_id: str, state: str) -> None:
        await self.db.execute("UPDATE gateway_jobs SET webhook_state = ?, webhook_until = NULL WHERE id = ?",
                              (state, job_id))

    async def unsent_webhooks(self, older_than_s: float) -> list[str]:
        """Finished jobs whose webhook nobody is sending (the replica that finished them died)."""
        now = time.time()
        rows = await self.db.fetchall(
            "SELECT id FROM gateway_jobs WHERE state IN ('succeeded', 'failed', 'cancelled', 'lost')"
            " AND ((webhook_state = 'pending' AND finished_at < ?)"
            " OR (webhook_state = 'sending' AND webhook_until < ?))"
            " ORDER BY finished_at LIMIT 100", (now - older_than_s, now))
        return [r["id"] for r in rows]

    async def created_since(self, tenant: str, since: float) -> int:
        row = await self.db.fetchone("SELECT COUNT(*) AS n FROM gateway_jobs WHERE tenant = ? AND created_at >= ?",
                                     (tenant, since))
        return int(row["n"]) if row else 0

    async def counts(self) -> list[Row]:
        return await self.db.fetchall(
            "SELECT state, COALESCE(provider, '') AS provider, COUNT(*) AS n, SUM(cost_usd) AS usd"
            " FROM gateway_jobs GROUP BY state, COALESCE(provider, '')")

    async def unfinished(self) -> list[str]:
        rows = await self.db.fetchall("SELECT id FROM gateway_jobs WHERE state IN ('queued', 'running')"
                                      " ORDER BY created_at")
        return [r["id"] for r in rows]
