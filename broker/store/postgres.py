"""The ledger on PostgreSQL: one budget, one ledger for every process on every machine.

Same operations and rows as the SQLite ledger (``broker.money.ledger``). A reservation is one call
of ``broker_reserve`` (see ``migrations/postgresql/001_ledger.sql``): one round trip, one short
transaction that locks the budget row, sums what is spent and reserved in one snapshot, and inserts
the attempt — so the lock is held only while the server works, never across a network hop.
Finished attempts are written behind in small batches, as on SQLite. Each process registers as an
*owner* and beats every ``heartbeat_s``; reservations of an owner silent for ``owner_timeout_s``
stop counting at once and are marked ``orphaned`` by whichever live process notices first.
"""

from __future__ import annotations

import atexit
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import PoolTimeout

from broker.errors import ConfigurationError
from broker.redact import scrub
from broker.store.base import OPEN_STATUSES, BudgetFull, LedgerBusy, SpendLimit
from broker.store.pg_pool import open_pool
from broker.store.url import StoreURL

# finished attempts (record_attempt's 17 columns, close_attempt's 10), as arrays: one call per batch; the
# settle changes only rows this store still owns (migration 004)
_SETTLE_COLUMNS = ", ".join(
    f"%s::{t}[]" for t in ("text", "text", "text", "text", "text", "text", "text", "text", "float8", "float8",
                           "float8", "int4", "int4", "float8", "float8", "int4", "text",
                           "text", "text", "float8", "float8", "int4", "text", "text", "float8", "int4", "int8"))
_SETTLE = f"SELECT broker_settle({_SETTLE_COLUMNS}, %s)"
_RESERVE_ARGS = ("%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::float8[], %s::float8[], %s::text[], %s, %s, %s, %s, "
                 "%s, %s::text[]")
_RESERVE = f"SELECT * FROM broker_reserve({_RESERVE_ARGS})"
_SETTLE_RESERVE = f"SELECT * FROM broker_settle_reserve({_SETTLE_COLUMNS}, {_RESERVE_ARGS})"
_OPEN = "(" + ", ".join(f"'{s}'" for s in OPEN_STATUSES) + ")"  # for SQL: ('reserved', 'running')


def _note(message: str | None) -> str | None:
    """What a row keeps of a message: scrubbed of credentials (the ledger outlives any log), 500 chars."""
    return scrub(message or "")[:500] or None


class PostgresLedger:
    """``LedgerStore`` on PostgreSQL (psycopg 3, a small connection pool)."""

    remote = True

    def __init__(self, url: str | StoreURL, *, write_behind_s: float = 0.05, heartbeat_s: float = 5.0,
                 owner_timeout_s: float = 30.0, pool_size: int = 4, connect_timeout_s: float = 10.0) -> None:
        self.url = url if isinstance(url, StoreURL) else StoreURL.parse(url)
        if self.url.dialect != "postgresql":
            raise ConfigurationError(f"not a PostgreSQL URL: {self.url}")
        self.write_behind_s = write_behind_s
        self.heartbeat_s = heartbeat_s
        self.owner_timeout_s = owner_timeout_s
        self.host = socket.gethostname()
        self.owner = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._pool = open_pool(self.url, max_size=pool_size, timeout_s=connect_timeout_s)
        self._lock = threading.Lock()  # guards the lists below
        self._flush_lock = threading.Lock()  # one writer at a time; readers wait for a write in progress
        self._pending: list[tuple[Any, ...]] = []
        self._pending_updates: list[tuple[Any, ...]] = []
        self._closed = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        now = time.time()
        with self._pool.connection() as conn:
            conn.execute("INSERT INTO owners VALUES (%s, %s, %s, %s, %s)",
                         (self.owner, self.host, os.getpid(), now, now))
        self._beater = threading.Thread(target=_beat, args=(weakref.ref(self), self._stop, heartbeat_s),
                                        name="broker-store-heartbeat", daemon=True)
        self._beater.start()
        _LIVE.add(self)

    def __repr__(self) -> str:
        return f"<PostgresLedger {self.url}>"

    @property
    def path(self) -> str:
        """Where the ledger lives, safe to print (the password is never shown)."""
        return str(self.url)

    # -- writing ----------------------------------------------------------------------------
    def open_attempt(self, job_id: str, provider: str, *, hardware: str | None = None, task: str | None = None,
                     reserved_usd: float = 0.0, min_reserved_usd: float | None = None,
                     expires_at: float | None = None, hedge: bool = False, limits: Sequence[SpendLimit] = (),
                     now: float | None = None, wait: bool = True,
                     provider_job_id: str | None = None, tenant: str | None = None) -> tuple[int, float]:
        now = time.time() if now is None else now
        floor = reserved_usd if min_reserved_usd is None else min(min_reserved_usd, reserved_usd)
        args = (job_id, task, provider, hardware, int(hedge), reserved_usd, floor, expires_at, self.owner, now,
                now - self.owner_timeout_s, [lim.cap_usd for lim in limits],
                [lim.window_s for lim in limits], [lim.job_id for lim in limits], not wait, os.getpid(), self.host,
                provider_job_id, tenant, [lim.tenant for lim in limits])
        with self._flush_lock:
            # our own finished attempts go first, in the same transaction and round trip: they count
            batch = self._take() if limits else None
            try:
                with self._pool.connection() as conn:
                    if batch:
                        row = conn.execute(_SETTLE_RESERVE, [*batch[2], *args]).fetchone()
                    else:
                        row = conn.execute(_RESERVE, args).fetchone()
            except BaseException as exc:
                if batch:
                    self._requeue(batch)
                if isinstance(exc, pg_errors.LockNotAvailable):
                    raise LedgerBusy(str(exc)) from None
                raise
        assert row is not None
        attempt_id, amount, failed, spent, settled = row
        if attempt_id is None:
            limit = limits[failed - 1]
            raise BudgetFull(
                limit.cap_usd - settled + 1e-12 >= floor,
                f"{limit.label}: ${spent:.6f} already spent or reserved; this attempt needs "
                f"${floor:.6f} more and the limit is ${limit.cap_usd:g}")
        return int(attempt_id), float(amount)

    def record_attempt(self, job_id: str, provider: str, status: str, *, hardware: str | None = None,
                       task: str | None = None, hedge: bool = False, reserved_usd: float = 0.0, started_at: float,
                       provider_job_id: str | None = None, billed_seconds: float | None = None,
                       cost_usd: float = 0.0, cost_estimated: bool = True, error_class: str | None = None,
                       message: str | None = None, ended_at: float | None = None, unpriced: bool = False,
                       tenant: str | None = None) -> None:
        row = (job_id, task, provider, hardware, provider_job_id, status, error_class, _note(message),
               reserved_usd, billed_seconds, cost_usd, int(cost_estimated), int(hedge), started_at,
               time.time() if ended_at is None else ended_at, int(unpriced), tenant)
        with self._lock:
            self._pending.append(row)
        self._schedule_flush()

    def close_attempt(self, attempt_id: int, status: str, *, provider_job_id: str | None = None,
                      billed_seconds: float | None = None, cost_usd: float = 0.0, cost_estimated: bool = True,
                      error_class: str | None = None, message: str | None = None,
                      ended_at: float | None = None, unpriced: bool = False) -> None:
        row = (status, provider_job_id, billed_seconds, cost_usd, int(cost_estimated), error_class,
               _note(message), time.time() if ended_at is None else ended_at, int(unpriced),
               attempt_id)
        with self._lock:
            # Until this lands the reservation still counts in full: late is safe, never optimistic.
            self._pending_updates.append(row)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self.write_behind_s <= 0 or len(self._pending) + len(self._pending_updates) >= 512:
            self.flush()
            return
        if self._flusher is None:
            with self._lock:
                if self._flusher is None:
                    self._flusher = threading.Thread(target=_flush_loop, name="broker-store-flush", daemon=True,
                                                     args=(weakref.ref(self), self._wake, self.write_behind_s))
                    self._flusher.start()
        self._wake.set()

    def flush(self) -> None:
        """Write every attempt still held in memory (one call of ``broker_settle``: one transaction).

        Returns once they are written, also when another thread was already writing them."""
        with self._flush_lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        batch = self._take()
        if not batch or self._closed:
            return
        try:
            with self._pool.connection() as conn:
                conn.execute(_SETTLE, [*batch[2], self.owner])
        except BaseException:
            self._requeue(batch)
            raise

    def _take(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[list[Any]]] | None:
        """Hand over the held attempts as broker_settle's column arrays (None when there are none)."""
        with self._lock:
            inserts, updates = self._pending, self._pending_updates
            self._pending, self._pending_updates = [], []
        if not (inserts or updates):
            return None
        columns = [list(c) for c in zip(*inserts, strict=True)] if inserts else [[] for _ in range(17)]
        columns += [list(c) for c in zip(*updates, strict=True)] if updates else [[] for _ in range(10)]
        return inserts, updates, columns

    def _requeue(self, batch: tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[list[Any]]]) -> None:
        """Not written: hold them again, ahead of anything newer."""
        with self._lock:
            self._pending[:0], self._pending_updates[:0] = batch[0], batch[1]

    def _flush_quietly(self) -> None:
        if self._pending or self._pending_updates or self._flush_lock.locked():
            self.flush()

    # -- the provider's job, and owners ------------------------------------------------------
    def started(self, attempt_id: int, provider_job_id: str, *, wait: bool = True) -> None:
        """Write-ahead: the provider accepted the job; its id is stored before anyone waits on it."""
        with self._pool.connection() as conn:
            conn.execute(f"UPDATE attempts SET status = 'running', provider_job_id = %s, heartbeat_at = %s "
                         f"WHERE id = %s AND status IN {_OPEN}", (provider_job_id, time.time(), attempt_id))

    def mark_cancelling(self, attempt_id: int, *, provider_job_id: str | None, expires_at: float | None,
                        message: str | None = None) -> None:
        """Abandoned, cancel unconfirmed: keep the reservation (until ``expires_at``; None: until settled)."""
        with self._pool.connection() as conn:
            conn.execute(f"UPDATE attempts SET status = 'cancelling', provider_job_id = COALESCE(%s, provider_job_id), "
                         f"expires_at = %s, message = %s, heartbeat_at = %s WHERE id = %s AND status IN {_OPEN}",
                         (provider_job_id, expires_at, _note(message), time.time(), attempt_id))

    def heartbeat(self, now: float | None = None) -> int:
        """Tell the fleet this process is alive (its reservations keep counting); returns its open attempts."""
        now = time.time() if now is None else now
        with self._pool.connection() as conn:
            conn.execute("INSERT INTO owners VALUES (%s, %s, %s, %s, %s) "
                         "ON CONFLICT (owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                         (self.owner, self.host, os.getpid(), now, now))
            row = conn.execute(f"UPDATE attempts SET heartbeat_at = %s WHERE owner = %s AND status IN {_OPEN}",
                               (now, self.owner))
            return row.rowcount

    def orphans(self, *, stale_s: float, alive: Callable[[int], bool], now: float | None = None
                ) -> list[dict[str, Any]]:
        """Open attempts whose owner is gone: a dead pid on this host, or no heartbeat for ``stale_s``."""
        now = time.time() if now is None else now
        self._flush_quietly()
        with self._pool.connection() as conn:
            rows = conn.cursor(row_factory=dict_row).execute(
                f"SELECT a.*, GREATEST(a.heartbeat_at, o.heartbeat_at) AS beat FROM attempts a "
                f"LEFT JOIN owners o ON o.owner = a.owner WHERE a.status IN {_OPEN} ORDER BY a.id").fetchall()
        out = []
        for r in rows:
            beat = r.pop("beat") or r["started_at"]
            if r["owner"] == self.owner:
                continue
            pid = r["owner_pid"]
            if (r["owner_host"] == self.host and pid is not None and pid != os.getpid() and not alive(int(pid))) \
                    or now - beat > stale_s:
                out.append(r)
        return out

    def claim(self, row: dict[str, Any]) -> bool:
        """Take over an orphaned open attempt; False if another process claimed it first."""
        with self._pool.connection() as conn:
            cur = conn.execute(
                f"UPDATE attempts SET owner = %s, owner_pid = %s, owner_host = %s, heartbeat_at = %s "
                f"WHERE id = %s AND owner IS NOT DISTINCT FROM %s AND status IN {_OPEN}",
                (self.owner, os.getpid(), self.host, time.time(), row["id"], row["owner"]))
            return cur.rowcount == 1

    def release_dead(self, now: float | None = None) -> list[dict[str, Any]]:
        """Close ``lost`` at $0 the open attempts of owners silent past ``owner_timeout_s`` that never
        reached a provider (no provider job id: nothing can bill); returns them.

        Their reservations already stopped counting when the heartbeat went stale; this makes it visible.
        Rows with a provider job id keep their reservation until reconciliation (``orphans``/``claim``)
        asks the provider and settles them: the job may still be running, and billing."""
        now = time.time() if now is None else now
        with self._pool.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            rows = cur.execute(
                f"UPDATE attempts a SET status = 'lost', ended_at = %s, "
                f"message = 'its process stopped beating before the provider took the job (owner ' || a.owner || ')' "
                f"WHERE a.status IN {_OPEN} AND a.owner IS NOT NULL AND a.provider_job_id IS NULL AND NOT EXISTS "
                f"(SELECT 1 FROM owners o WHERE o.owner = a.owner AND o.heartbeat_at >= %s) RETURNING a.*",
                (now, now - self.owner_timeout_s)).fetchall()
            cur.execute(f"DELETE FROM owners o WHERE o.heartbeat_at < %s AND NOT EXISTS "
                        f"(SELECT 1 FROM attempts a WHERE a.owner = o.owner AND a.status IN {_OPEN})",
                        (now - self.owner_timeout_s,))
        return rows

    # -- reading ----------------------------------------------------------------------------
    def spent(self, *, window_s: float | None = None, job_id: str | None = None, now: float | None = None,
              tenant: str | None = None) -> float:
        """Dollars spent (and still reserved) over the last ``window_s`` seconds (or ever), by one job, or by one
        tenant over the window."""
        self._flush_quietly()
        now = time.time() if now is None else now
        with self._pool.connection() as conn:
            row = conn.execute("SELECT broker_spent(%s, %s, %s, %s, %s)",
                               (now, now - self.owner_timeout_s, window_s, job_id, tenant)).fetchone()
        return float(row[0]) if row else 0.0

    def total(self) -> float:
        self._flush_quietly()
        with self._pool.connection() as conn:
            row = conn.execute("SELECT COALESCE(SUM(cost_usd), 0) FROM attempts").fetchone()
        return float(row[0]) if row else 0.0

    def attempts(self, *, job_id: str | None = None, provider: str | None = None, since: float | None = None,
                 limit: int | None = None, tenant: str | None = None) -> list[dict[str, Any]]:
        where: list[sql.Composable] = [sql.SQL("TRUE")]
        args: list[Any] = []
        for column, value in (("job_id", job_id), ("provider", provider), ("tenant", tenant)):
            if value is not None:
                where.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
                args.append(value)
        if since is not None:
            where.append(sql.SQL("started_at >= %s"))
            args.append(since)
        cond = sql.SQL(" AND ").join(where)
        if limit is None:
            query = sql.SQL("SELECT * FROM attempts WHERE {} ORDER BY started_at, id").format(cond)
        else:
            query = sql.SQL("SELECT * FROM (SELECT * FROM attempts WHERE {} ORDER BY started_at DESC, id DESC "
                            "LIMIT {}) t ORDER BY started_at, id").format(cond, sql.Literal(int(limit)))
        self._flush_quietly()
        with self._pool.connection() as conn:
            return list(conn.cursor(row_factory=dict_row).execute(query, args).fetchall())

    def summary(self, *, since: float | None = None) -> list[dict[str, Any]]:
        """Spend by provider and UTC day: attempts, successes, billed seconds, dollars."""
        query = (
            "SELECT to_char(to_timestamp(started_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, provider, "
            "COUNT(*) AS attempts, COUNT(*) FILTER (WHERE status = 'succeeded') AS succeeded, "
            "COUNT(*) FILTER (WHERE status IN ('failed', 'lost')) AS failed, "
            "COALESCE(SUM(billed_seconds), 0) AS billed_seconds, COALESCE(SUM(cost_usd), 0) AS cost_usd, "
            "SUM(cost_estimated)::integer AS estimated "
            "FROM attempts WHERE started_at >= %s GROUP BY day, provider ORDER BY day, provider")
        self._flush_quietly()
        with self._pool.connection() as conn:
            return list(conn.cursor(row_factory=dict_row).execute(query, (since or 0.0,)).fetchall())

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
            with self._pool.connection() as conn:
                conn.execute("DELETE FROM owners o WHERE o.owner = %s AND NOT EXISTS (SELECT 1 FROM attempts a "
                             f"WHERE a.owner = o.owner AND a.status IN {_OPEN})", (self.owner,))
        finally:
            self._closed = True
            self._stop.set()
            self._wake.set()
            self._pool.close()
            _LIVE.discard(self)


def _flush_loop(ref: weakref.ref[PostgresLedger], wake: threading.Event, delay: float) -> None:
    """Write finished attempts ``delay`` after the first of a batch arrives; ends with the ledger."""
    while True:
        if not wake.wait(timeout=5.0):
            if ref() is None:
                return
            continue
        time.sleep(delay)  # gather the batch (this thread only, nothing waits on it)
        wake.clear()
        ledger = ref()
        if ledger is None or ledger._closed:
            return
        try:
            ledger.flush()
        except psycopg.Error:
            pass  # held again; a reader or the next reservation retries
        del ledger


def _beat(ref: weakref.ref[PostgresLedger], stop: threading.Event, every_s: float) -> None:
    """Heartbeat, and release what dead owners still hold (whoever notices first)."""
    while not stop.wait(every_s):
        ledger = ref()
        if ledger is None:
            return
        try:
            ledger.heartbeat()
            ledger.release_dead()
        except (psycopg.Error, PoolTimeout):
            pass  # the database is away for now; the next beat tries again
        del ledger


_LIVE: weakref.WeakSet[PostgresLedger] = weakref.WeakSet()


def flush_all() -> None:
    """Write what every open PostgreSQL ledger of this process still holds (on SIGTERM)."""
    for ledger in list(_LIVE):
        try:
            ledger.flush()
        except (psycopg.Error, PoolTimeout):
            pass


@atexit.register
def _close_all() -> None:
    """Attempts still held in memory reach the database when the interpreter exits normally."""
    for ledger in list(_LIVE):
        try:
            ledger.close()
        except (psycopg.Error, PoolTimeout):
            pass
