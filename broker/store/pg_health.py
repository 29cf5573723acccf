"""Endpoint health shared through PostgreSQL: a table as the truth, LISTEN/NOTIFY as the doorbell.

``endpoint_health`` holds each endpoint's circuit (open until when, ejections so far), its 429
cooldown and who holds the half-open trial lease. Every change is written and announced with
``pg_notify`` in one transaction, so a listener never hears of a change it cannot read. Each process
keeps one listening connection in a thread; it re-reads the whole table when it (re)connects, so a
missed notification costs at most one reconnect. Notifications are per database, so the channel is
named after the schema: fleets (and tests) in separate schemas do not hear each other.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import PoolTimeout

from broker.store.base import HealthEvent
from broker.store.pg_pool import open_pool
from broker.store.url import StoreURL


class PostgresHealth:
    """``SharedHealth`` on PostgreSQL."""

    def __init__(self, url: str | StoreURL, *, reconnect_s: float = 1.0) -> None:
        self.url = url if isinstance(url, StoreURL) else StoreURL.parse(url)
        self.origin = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.channel = f"broker_health_{self.url.schema or 'public'}"
        self.reconnect_s = reconnect_s
        self._pool = open_pool(self.url, max_size=2)
        self._stop = threading.Event()
        self._listener: threading.Thread | None = None
        self._conn: psycopg.Connection[Any] | None = None

    def __repr__(self) -> str:
        return f"<PostgresHealth {self.url}>"

    def publish(self, event: HealthEvent) -> None:
        now = time.time()
        e = HealthEvent(event.kind, event.endpoint, event.until, event.ejections, self.origin)
        if e.kind == "opened":
            update = ("open_until = %(until)s, ejections = GREATEST(endpoint_health.ejections, %(ejections)s), "
                      "trial_owner = NULL, trial_until = NULL")
        elif e.kind == "closed":
            update = "open_until = NULL, ejections = GREATEST(endpoint_health.ejections - 1, 0), trial_owner = NULL"
        elif e.kind == "cooldown":
            update = "cooldown_until = GREATEST(COALESCE(endpoint_health.cooldown_until, 0), %(until)s)"
        else:
            raise ValueError(f"unknown health event {e.kind!r}")
        params = {"endpoint": e.endpoint, "until": e.until, "ejections": e.ejections, "now": now,
                  "channel": self.channel, "payload": json.dumps(e.__dict__)}
        opened = e.until if e.kind == "opened" else None
        cooling = e.until if e.kind == "cooldown" else None
        params.update(opened=opened, cooling=cooling)
        with self._pool.connection() as conn, conn.transaction():
            conn.execute(
                "INSERT INTO endpoint_health (endpoint, open_until, ejections, cooldown_until, updated_at) "
                "VALUES (%(endpoint)s, %(opened)s, %(ejections)s, %(cooling)s, %(now)s) "
                f"ON CONFLICT (endpoint) DO UPDATE SET {update}, updated_at = %(now)s", params)
            conn.execute("SELECT pg_notify(%(channel)s, %(payload)s)", params)

    def grant_trial(self, endpoint: str, lease_s: float) -> bool:
        now = time.time()
        with self._pool.connection() as conn:
            row = conn.execute(
                "UPDATE endpoint_health SET trial_owner = %s, trial_until = %s, updated_at = %s "
                "WHERE endpoint = %s AND (trial_owner IS NULL OR trial_until < %s OR trial_owner = %s) "
                "RETURNING endpoint", (self.origin, now + lease_s, now, endpoint, now, self.origin)).fetchone()
            if row is not None:
                return True
            # No row at all: nobody opened it fleet-wide (it opened only here), so the trial is ours.
            exists = conn.execute("SELECT 1 FROM endpoint_health WHERE endpoint = %s", (endpoint,)).fetchone()
        return exists is None

    def release_trial(self, endpoint: str) -> None:
        with self._pool.connection() as conn:
            conn.execute("UPDATE endpoint_health SET trial_owner = NULL, trial_until = NULL "
                         "WHERE endpoint = %s AND trial_owner = %s", (endpoint, self.origin))

    def current(self) -> list[HealthEvent]:
        """The state every endpoint is in now, as the events that would lead to it."""
        now = time.time()
        with self._pool.connection() as conn:
            rows = conn.execute("SELECT endpoint, open_until, ejections, cooldown_until "
                                "FROM endpoint_health").fetchall()
        out = []
        for endpoint, open_until, ejections, cooldown_until in rows:
            if open_until is not None:
                out.append(HealthEvent("opened", endpoint, open_until, ejections))
            if cooldown_until is not None and cooldown_until > now:
                out.append(HealthEvent("cooldown", endpoint, cooldown_until))
        return out

    def subscribe(self, deliver: Callable[[HealthEvent], None]) -> None:
        ready = threading.Event()
        self._listener = threading.Thread(target=self._listen, args=(deliver, ready), daemon=True,
                                          name="broker-health-listen")
        self._listener.start()
        ready.wait(10.0)  # listening (or given up for now) before the first job is routed

    def _listen(self, deliver: Callable[[HealthEvent], None], ready: threading.Event) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url.dsn, autocommit=True) as conn:
                    self._conn = conn
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                    for event in self.current():  # after LISTEN: nothing falls between the read and the bell
                        deliver(event)
                    ready.set()
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            data = json.loads(note.payload)
                            if data.get("origin") != self.origin:
                                deliver(HealthEvent(**data))
            except (psycopg.Error, PoolTimeout, OSError, ValueError):
                ready.set()
                if self._stop.wait(self.reconnect_s):
                    return
            finally:
                self._conn = None

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.join(timeout=2.0)
        self._pool.close()
