"""The ledger: every attempt at every provider, what it was reserved and what it cost (SQLite).

The embedded backend of ``broker.store`` (``LedgerStore``); ``broker.store.postgres`` is the shared one.

One table, one row per attempt: opened (``reserved``) before a billable provider is called, marked
``running`` with the provider's job id before we wait on it (write-ahead: a billed job is never
invisible, even after kill -9), ``cancelling`` while an abandoned job's cancel is unconfirmed, and
closed with its outcome, billed seconds and cost after. Open rows carry their owner (pid, host) and
a heartbeat, so the next process can find and settle the rows of one that died (``orphans``).
Budgets are checked and the reservation written in the same ``BEGIN IMMEDIATE`` transaction, so
two processes sharing the file cannot both squeeze under the same limit. WAL mode lets readers
(``broker costs``) run while jobs write. Settled spend is also summed into minute and hour buckets,
so checking a rolling daily or monthly budget reads at most a few thousand small rows however many
attempts the ledger holds.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from broker.errors import ConfigurationError
from broker.money.ledger_threads import HEARTBEAT_S, LIVE, beat, flush_all, flusher
from broker.redact import scrub
from broker.store.base import OPEN_STATUSES, BudgetFull, LedgerBusy, SpendLimit

__all__ = ["HEARTBEAT_S", "OPEN_STATUSES", "BudgetFull", "Ledger", "LedgerBusy", "SpendLimit", "flush_all", "owner"]

SCHEMA_VERSION = 3
_OPEN = "status IN ('reserved', 'running', 'cancelling')"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL,
    task TEXT,
    provider TEXT NOT NULL,
    hardware TEXT,
    provider_job_id TEXT,
    status TEXT NOT NULL,
    error_class TEXT,
    message TEXT,
    reserved_usd REAL NOT NULL DEFAULT 0,
    billed_seconds REAL,
    cost_usd REAL NOT NULL DEFAULT 0,
    cost_estimated INTEGER NOT NULL DEFAULT 1,
    hedge INTEGER NOT NULL DEFAULT 0,
    started_at REAL NOT NULL,
    ended_at REAL,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS attempts_started ON attempts (started_at);
CREATE INDEX IF NOT EXISTS attempts_job ON attempts (job_id);
CREATE TABLE IF NOT EXISTS spend_buckets (
    width INTEGER NOT NULL,
    start INTEGER NOT NULL,
    usd REAL NOT NULL,
    PRIMARY KEY (width, start)
) WITHOUT ROWID;
"""

#: bucket widths for settled spend: minutes for windows up to two days, hours beyond
_BUCKETS = (60, 3600)

# v1 -> v2: the owner of an open attempt and its heartbeat (reconcile after a crash), a 'cancelling'
# status that keeps its reservation, and an explicit "no price row" flag (an unknown cost is not $0).
_V2_COLUMNS = (("owner_pid", "INTEGER"), ("owner_host", "TEXT"), ("heartbeat_at", "REAL"),
               ("unpriced", "INTEGER NOT NULL DEFAULT 0"))
_V2_INDEX = ("DROP INDEX IF EXISTS attempts_open",
             f"CREATE INDEX IF NOT EXISTS attempts_open2 ON attempts (started_at) WHERE {_OPEN}")
# v2 -> v3: the tenant an attempt ran for (a gateway API key), so a tenant's budget counts its own rows
_V3_COLUMNS = (("tenant", "TEXT"),)
_V3_INDEX = ("CREATE INDEX IF NOT EXISTS attempts_tenant ON attempts (tenant, ended_at) WHERE tenant IS NOT NULL",)

# A job's spend counts a closed attempt's cost and an open one's reservation (until it expires: a
# process that died mid-job must not hold the budget forever).
_SPEND = """
SELECT COALESCE(SUM(CASE WHEN status IN ('reserved', 'running', 'cancelling') AND (expires_at IS NULL OR expires_at > ?)
                        THEN MAX(reserved_usd, cost_usd)
                        ELSE cost_usd END), 0)
FROM attempts WHERE {where}
"""


_OPEN_SPEND = """
SELECT COALESCE(SUM(MAX(reserved_usd, cost_usd)), 0) FROM attempts
WHERE status IN ('reserved', 'running', 'cancelling') AND (expires_at IS NULL OR expires_at > ?)
  AND started_at >= ?
"""


def _note(message: str | None) -> str | None:
    """What a row keeps of a message: scrubbed of credentials (the ledger outlives any log), 500 chars."""
    return scrub(message or "")[:500] or None


def owner() -> tuple[int, str]:
    """Who owns the attempts this process opens: (pid, host)."""
    return os.getpid(), socket.gethostname()


class Ledger:
    #: embedded: a reservation takes microseconds, so the accountant may make it on the event loop
    remote = False

    def __init__(self, path: str | Path = ":memory:", *, busy_timeout_s: float = 30.0,
                 write_behind_s: float = 0.05) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            p = Path(self.path).expanduser()
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigurationError(f"cannot create the ledger directory {p.parent}: {exc.strerror}") from None
            self.path = str(p)
        self._lock = threading.Lock()
        # Finished attempts are written behind, in batches: one transaction per ~50 ms instead of one
        # per job keeps the manager's overhead in microseconds. Reads and reservations flush first.
        self.write_behind_s = write_behind_s
        self._pending: list[tuple[Any, ...]] = []
        self._pending_updates: list[tuple[Any, ...]] = []
        self._closed = False
        self._wake = threading.Event()
        self._flusher: threading.Thread | None = None
        self._beater: threading.Thread | None = None
        self._stop_beat = threading.Event()
        self._written: tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]] = ([], [])
        self._busy_ms = int(busy_timeout_s * 1000)
        try:
            self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA schema_version")  # reads the header: a file that is not a database fails here
        except sqlite3.Error as exc:
            raise ConfigurationError(f"cannot open the ledger {self.path}: {exc} "
                                     "(move the file aside, or set ledger.path / BROKER_LEDGER__PATH)") from None
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            if self.path != ":memory:":
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        self._db.execute(stmt)
                row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if row is not None and int(row[0]) > SCHEMA_VERSION:
                    raise ConfigurationError(
                        f"the ledger {self.path} has schema {row[0]}; this broker knows up to {SCHEMA_VERSION}"
                    )
                self._upgrade()
                self._db.execute("INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT (key) DO UPDATE "
                                 "SET value = excluded.value", (str(SCHEMA_VERSION),))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        LIVE.add(self)

    def __repr__(self) -> str:
        return f"<Ledger {self.path}>"

    def _upgrade(self) -> None:
        """Bring a v1 or v2 file (or the v1 tables just created) to v3; safe to run on any version."""
        have = {r[1] for r in self._db.execute("PRAGMA table_info(attempts)").fetchall()}
        for name, decl in _V2_COLUMNS + _V3_COLUMNS:
            if name not in have:
                self._db.execute(f"ALTER TABLE attempts ADD COLUMN {name} {decl}")
        for stmt in _V2_INDEX + _V3_INDEX:
            self._db.execute(stmt)

    # -- writing ----------------------------------------------------------------------------
    def open_attempt(
        self,
        job_id: str,
        provider: str,
        *,
        hardware: str | None = None,
        task: str | None = None,
        reserved_usd: float = 0.0,
        min_reserved_usd: float | None = None,
        expires_at: float | None = None,
        hedge: bool = False,
        limits: Sequence[SpendLimit] = (),
        now: float | None = None,
        wait: bool = True,
        provider_job_id: str | None = None,
        tenant: str | None = None,
    ) -> tuple[int, float]:
        """Record an attempt about to start; returns (attempt id, dollars reserved).

        With ``limits``, the reservation is ``reserved_usd`` shrunk to the headroom left under every
        limit, but never below ``min_reserved_usd`` (default: all of it): if that does not fit,
        ``BudgetExceeded`` is raised and nothing is written. With ``wait=False``, ``LedgerBusy`` is
        raised at once if another process holds the write lock (the caller then waits off the loop).
        """
        now = time.time() if now is None else now
        insert = ("INSERT INTO attempts (job_id, task, provider, hardware, status, reserved_usd, hedge, "
                  "started_at, expires_at, owner_pid, owner_host, heartbeat_at, provider_job_id, tenant) "
                  "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
        pid, host = owner()
        status = "reserved" if provider_job_id is None else "running"
        self._start_heartbeat()
        with self._lock:
            if not limits:
                row = (job_id, task, provider, hardware, status, reserved_usd, int(hedge), now, expires_at,
                       pid, host, now, provider_job_id, tenant)
                cur = self._write(insert, row, wait)
                return int(cur.lastrowid or 0), reserved_usd
            floor = reserved_usd if min_reserved_usd is None else min(min_reserved_usd, reserved_usd)
            try:
                if not wait:
                    self._db.execute("PRAGMA busy_timeout = 0")
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if wait or "lock" not in str(exc):
                    raise
                raise LedgerBusy(str(exc)) from None
            finally:
                if not wait:
                    self._db.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
            try:
                self._write_pending()  # finished attempts ride along in this transaction
                amount = reserved_usd
                for limit in limits:
                    spent = self._spent(now, limit)
                    headroom = limit.cap_usd - spent
                    if headroom + 1e-12 < floor:
                        raise BudgetFull(
                            limit.cap_usd - self._spent(now, limit, settled_only=True) + 1e-12 >= floor,
                            f"{limit.label}: ${spent:.6f} already spent or reserved; this attempt needs "
                            f"${floor:.6f} more and the limit is ${limit.cap_usd:g}"
                        )
                    amount = min(amount, headroom)
                amount = max(amount, floor)
                row = (job_id, task, provider, hardware, status, amount, int(hedge), now, expires_at,
                       pid, host, now, provider_job_id, tenant)
                cur = self._db.execute(insert, row)
                self._db.execute("COMMIT")
                self._written = ([], [])
                return int(cur.lastrowid or 0), amount
            except BaseException:
                self._db.execute("ROLLBACK")
                self._requeue()
                raise

    def record_attempt(
        self,
        job_id: str,
        provider: str,
        status: str,
        *,
        hardware: str | None = None,
        task: str | None = None,
        hedge: bool = False,
        reserved_usd: float = 0.0,
        started_at: float,
        provider_job_id: str | None = None,
        billed_seconds: float | None = None,
        cost_usd: float = 0.0,
        cost_estimated: bool = True,
        error_class: str | None = None,
        message: str | None = None,
        ended_at: float | None = None,
        unpriced: bool = False,
        tenant: str | None = None,
    ) -> None:
        """Write a finished attempt in one go (used for attempts that could not bill: nothing to write ahead)."""
        row = (job_id, task, provider, hardware, provider_job_id, status, error_class, _note(message),
               reserved_usd, billed_seconds, cost_usd, int(cost_estimated), int(hedge), started_at,
               time.time() if ended_at is None else ended_at, int(unpriced), tenant)
        with self._lock:
            self._pending.append(row)
            self._schedule_flush()

    def close_attempt(
        self,
        attempt_id: int,
        status: str,
        *,
        provider_job_id: str | None = None,
        billed_seconds: float | None = None,
        cost_usd: float = 0.0,
        cost_estimated: bool = True,
        error_class: str | None = None,
        message: str | None = None,
        ended_at: float | None = None,
        unpriced: bool = False,
    ) -> None:
        row = (status, provider_job_id, billed_seconds, cost_usd, int(cost_estimated), error_class,
               _note(message), time.time() if ended_at is None else ended_at, int(unpriced), attempt_id)
        with self._lock:
            # Until this lands the reservation still counts in full: late is safe, never optimistic.
            self._pending_updates.append(row)
            self._schedule_flush()

    def started(self, attempt_id: int, provider_job_id: str, *, wait: bool = True) -> None:
        """Write-ahead: the provider accepted the job; its id is on disk before anyone waits on it."""
        with self._lock:
            self._write("UPDATE attempts SET status = 'running', provider_job_id = ?, heartbeat_at = ? "
                        f"WHERE id = ? AND {_OPEN}", (provider_job_id, time.time(), attempt_id), wait)

    def _write(self, sql: str, args: tuple[Any, ...], wait: bool) -> sqlite3.Cursor:
        """One autocommit statement (under ``_lock``); ``wait=False``: ``LedgerBusy`` if another process writes."""
        if wait or self.path == ":memory:":  # nobody else can hold an in-memory database's lock
            return self._db.execute(sql, args)
        self._db.execute("PRAGMA busy_timeout = 0")
        try:
            return self._db.execute(sql, args)
        except sqlite3.OperationalError as exc:
            if "lock" in str(exc):
                raise LedgerBusy(str(exc)) from None
            raise
        finally:
            self._db.execute(f"PRAGMA busy_timeout = {self._busy_ms}")

    def mark_cancelling(self, attempt_id: int, *, provider_job_id: str | None, expires_at: float | None,
                        message: str | None = None) -> None:
        """The job was abandoned but the provider has not confirmed it stopped: keep the reservation
        (until ``expires_at``, when the provider ends the job itself; None = until settled)."""
        with self._lock:
            self._db.execute(
                "UPDATE attempts SET status = 'cancelling', provider_job_id = COALESCE(?, provider_job_id), "
                f"expires_at = ?, message = ?, heartbeat_at = ? WHERE id = ? AND {_OPEN}",
                (provider_job_id, expires_at, _note(message), time.time(), attempt_id))

    def orphans(self, *, stale_s: float, alive: Callable[[int], bool], now: float | None = None
                ) -> list[dict[str, Any]]:
        """Open attempts whose owner is gone: a dead pid on this host, or no heartbeat for ``stale_s``."""
        now = time.time() if now is None else now
        me, host = owner()
        with self._lock:
            self._flush_locked()
            rows = [dict(r) for r in self._db.execute(f"SELECT * FROM attempts WHERE {_OPEN} ORDER BY id")]
        out = []
        for r in rows:
            pid, beat = r["owner_pid"], r["heartbeat_at"] or r["started_at"]
            if pid == me and r["owner_host"] == host:
                continue
            if (r["owner_host"] == host and pid is not None and not alive(int(pid))) or now - beat > stale_s:
                out.append(r)
        return out

    def claim(self, row: dict[str, Any]) -> bool:
        """Take over an orphaned open attempt; False if another process claimed it first."""
        pid, host = owner()
        with self._lock:
            cur = self._db.execute(
                "UPDATE attempts SET owner_pid = ?, owner_host = ?, heartbeat_at = ? WHERE id = ? AND "
                f"owner_pid IS ? AND owner_host IS ? AND {_OPEN}",
                (pid, host, time.time(), row["id"], row["owner_pid"], row["owner_host"]))
            return cur.rowcount == 1

    def heartbeat(self, now: float | None = None) -> int:
        """Tell other processes this one still owns its open attempts; returns how many."""
        pid, host = owner()
        with self._lock:
            if self._closed:
                return 0
            cur = self._db.execute(f"UPDATE attempts SET heartbeat_at = ? WHERE owner_pid = ? AND owner_host = ? "
                                   f"AND {_OPEN}", (time.time() if now is None else now, pid, host))
            return cur.rowcount

    def _start_heartbeat(self) -> None:
        if self._beater is None and self.path != ":memory:":
            self._beater = threading.Thread(target=beat, args=(weakref.ref(self), self._stop_beat),
                                            name="broker-ledger-heartbeat", daemon=True)
            self._beater.start()

    def _schedule_flush(self) -> None:
        if self.write_behind_s <= 0 or len(self._pending) + len(self._pending_updates) >= 512:
            self._flush_locked()
            return
        if self._flusher is None:
            self._flusher = threading.Thread(target=flusher, args=(weakref.ref(self), self._wake,
                                                                     self.write_behind_s),
                                             name="broker-ledger", daemon=True)
            self._flusher.start()
        if not self._wake.is_set():
            self._wake.set()

    def flush(self) -> None:
        """Write every attempt still held in memory."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not (self._pending or self._pending_updates):
            return
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.ProgrammingError:  # closed
            return
        try:
            self._write_pending()
            self._db.execute("COMMIT")
            self._written = ([], [])
        except BaseException:
            self._db.execute("ROLLBACK")
            self._requeue()
            raise

    def _write_pending(self) -> None:
        """Write held attempts inside the caller's transaction (kept in ``_written`` until it commits)."""
        inserts, updates = self._pending, self._pending_updates
        self._pending, self._pending_updates = [], []
        self._written = (inserts, updates)
        if inserts:
            self._db.executemany(
                "INSERT INTO attempts (job_id, task, provider, hardware, provider_job_id, status, error_class, "
                "message, reserved_usd, billed_seconds, cost_usd, cost_estimated, hedge, started_at, ended_at, "
                "unpriced, tenant) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", inserts)
        settled = [(r[14], r[10]) for r in inserts]
        pid, host = owner()
        for u in updates:
            # Only a row this process still owns: one a reconciler claimed (this process was thought dead) is
            # settled by the claimer from the provider's bill. A row settled before (or closed 'lost' at $0)
            # moves the buckets by the difference, so they always sum to the rows' costs.
            old = self._db.execute("SELECT cost_usd, ended_at FROM attempts WHERE id = ? AND owner_pid IS ? "
                                   "AND owner_host IS ?", (u[9], pid, host)).fetchone()
            if old is None:
                continue
            self._db.execute(
                "UPDATE attempts SET status = ?, provider_job_id = COALESCE(?, provider_job_id), "
                "billed_seconds = ?, cost_usd = ?, cost_estimated = ?, error_class = ?, message = ?, "
                "ended_at = ?, unpriced = ? WHERE id = ?", u)
            if old[0] and old[1] is not None:
                settled.append((old[1], -old[0]))
            settled.append((u[7], u[3]))
        buckets: dict[tuple[int, int], float] = {}
        for ended, usd in settled:
            if usd and ended is not None:
                for width in _BUCKETS:
                    key = (width, int(ended // width) * width)
                    buckets[key] = buckets.get(key, 0.0) + usd
        if buckets:
            self._db.executemany(
                "INSERT INTO spend_buckets VALUES (?, ?, ?) "
                "ON CONFLICT (width, start) DO UPDATE SET usd = usd + excluded.usd",
                [(w, start, usd) for (w, start), usd in buckets.items()])

    def _requeue(self) -> None:
        """The transaction that carried held attempts rolled back: hold them again."""
        inserts, updates = self._written
        self._written = ([], [])
        self._pending[:0], self._pending_updates[:0] = inserts, updates

    # -- reading ----------------------------------------------------------------------------
    def _spent(self, now: float, limit: SpendLimit, settled_only: bool = False) -> float:
        if limit.job_id is not None:
            if settled_only:
                return float(self._db.execute(f"SELECT COALESCE(SUM(cost_usd), 0) FROM attempts WHERE job_id = ? "
                                              f"AND NOT {_OPEN}", (limit.job_id,)).fetchone()[0])
            return float(self._db.execute(_SPEND.format(where="job_id = ?"), (now, limit.job_id)).fetchone()[0])
        since = now - limit.window_s if limit.window_s is not None else 0.0
        if limit.tenant is not None:
            # a tenant's own rows, by when they ended (the buckets are shared by every tenant)
            settled = self._db.execute(f"SELECT COALESCE(SUM(cost_usd), 0) FROM attempts WHERE tenant = ? "
                                       f"AND NOT {_OPEN} AND ended_at >= ?", (limit.tenant, since)).fetchone()[0]
            if settled_only:
                return float(settled)
            reserved = self._db.execute(_OPEN_SPEND + " AND tenant = ?", (now, since, limit.tenant)).fetchone()[0]
            return float(settled) + float(reserved)
        width = _BUCKETS[0] if limit.window_s is not None and limit.window_s <= 2 * 86400 else _BUCKETS[-1]
        # The bucket holding the window's start counts whole: an early "no", never an overspend.
        settled = self._db.execute("SELECT COALESCE(SUM(usd), 0) FROM spend_buckets WHERE width = ? AND start >= ?",
                                   (width, int(since // width) * width)).fetchone()[0]
        if settled_only:
            return float(settled)
        reserved = self._db.execute(_OPEN_SPEND, (now, since)).fetchone()[0]
        return float(settled) + float(reserved)

    def spent(self, *, window_s: float | None = None, job_id: str | None = None, now: float | None = None,
              tenant: str | None = None) -> float:
        """Dollars spent (and still reserved) over the last ``window_s`` seconds (or ever), by one job, or by one
        tenant over the window."""
        with self._lock:
            self._flush_locked()
            return self._spent(time.time() if now is None else now,
                               SpendLimit("spent", 0.0, window_s, job_id, tenant))

    def total(self) -> float:
        """Dollars billed across every closed attempt."""
        with self._lock:
            self._flush_locked()
            return float(self._db.execute("SELECT COALESCE(SUM(cost_usd), 0) FROM attempts").fetchone()[0])

    def attempts(self, *, job_id: str | None = None, provider: str | None = None, since: float | None = None,
                 limit: int | None = None, tenant: str | None = None) -> list[dict[str, Any]]:
        where: list[str] = ["1"]
        args: list[Any] = []
        if tenant is not None:
            where.append("tenant = ?")
            args.append(tenant)
        if job_id is not None:
            where.append("job_id = ?")
            args.append(job_id)
        if provider is not None:
            where.append("provider = ?")
            args.append(provider)
        if since is not None:
            where.append("started_at >= ?")
            args.append(since)
        sql = f"SELECT * FROM attempts WHERE {' AND '.join(where)} ORDER BY started_at, id"
        if limit is not None:
            sql = f"SELECT * FROM ({sql.replace('ORDER BY started_at, id', 'ORDER BY started_at DESC, id DESC')} " \
                  f"LIMIT {int(limit)}) ORDER BY started_at, id"
        with self._lock:
            self._flush_locked()
            return [dict(r) for r in self._db.execute(sql, args).fetchall()]

    def summary(self, *, since: float | None = None) -> list[dict[str, Any]]:
        """Spend by provider and UTC day: attempts, successes, billed seconds, dollars."""
        sql = (
            "SELECT date(started_at, 'unixepoch') AS day, provider, COUNT(*) AS attempts, "
            "SUM(status = 'succeeded') AS succeeded, SUM(status IN ('failed', 'lost')) AS failed, "
            "COALESCE(SUM(billed_seconds), 0) AS billed_seconds, COALESCE(SUM(cost_usd), 0) AS cost_usd, "
            "SUM(cost_estimated) AS estimated "
            "FROM attempts WHERE started_at >= ? GROUP BY day, provider ORDER BY day, provider"
        )
        with self._lock:
            self._flush_locked()
            return [dict(r) for r in self._db.execute(sql, (since or 0.0,)).fetchall()]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._flush_locked()
            self._closed = True
            self._db.close()
        self._wake.set()
        self._stop_beat.set()
        LIVE.discard(self)
