"""Where accepted jobs wait: in this process (embedded SQLite), or in PostgreSQL through procrastinate.

Both call ``JobRunner.run(job_id)``; the job row is the source of truth (state, lease), the queue only
says "run this id". With procrastinate any replica can accept a job and any replica can run it; a
replica that dies stops sending its heartbeat, and the sweep every replica runs retries its stalled
procrastinate jobs (they run once the dead replica's lease on the row has lapsed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from typing import Any

from broker.gateway.runner import JobRunner

log = logging.getLogger("broker.gateway.queues")

TASK_NAME = "broker.gateway.run_job"


class BusyRetry(Exception):
    """The job is held by a live replica's lease: try again later."""


class JobQueue(ABC):
    description: str

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def enqueue(self, job_id: str) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    def depth(self) -> int | None:
        return None


class InProcessQueue(JobQueue):
    """An asyncio queue and ``concurrency`` workers: one process, nothing to install."""

    description = "in-process queue (embedded SQLite: one process; use a postgresql:// database to scale out)"

    def __init__(self, runner: JobRunner, *, concurrency: int = 4, sweep_s: float = 5.0) -> None:
        self.runner = runner
        self.concurrency = concurrency
        self.sweep_s = sweep_s
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._queued: set[str] = set()

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self.concurrency)]
        self._tasks.append(asyncio.create_task(self._sweep()))

    async def enqueue(self, job_id: str) -> None:
        if job_id not in self._queued:
            self._queued.add(job_id)
            self._queue.put_nowait(job_id)

    def depth(self) -> int:
        return self._queue.qsize()

    async def _work(self) -> None:
        while True:
            job_id = await self._queue.get()
            self._queued.discard(job_id)
            try:
                await self.runner.run(job_id)
            except Exception:
                log.exception("job %s: runner failed", job_id)

    async def _sweep(self) -> None:
        """Pick up jobs left queued or running by an earlier process (their leases lapse)."""
        while True:
            for job_id in await self.runner.jobs.unfinished():
                await self.enqueue(job_id)
            with contextlib.suppress(Exception):
                await self.runner.send_unsent_webhooks()
            await asyncio.sleep(self.sweep_s)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []


class ProcrastinateQueue(JobQueue):
    """procrastinate on the shared PostgreSQL: LISTEN/NOTIFY wake-ups, worker heartbeats, stalled-job retry."""

    description = "procrastinate queue on PostgreSQL (replicas share it)"

    def __init__(self, runner: JobRunner, dsn: str, *, concurrency: int = 4, heartbeat_s: float = 2.0,
                 stalled_after_s: float = 10.0, sweep_s: float = 2.0, queue: str = "broker") -> None:
        try:
            import procrastinate
        except ImportError:
            from broker.errors import ConfigurationError

            raise ConfigurationError("a postgresql:// gateway needs: pip install 'broker[postgres]'") from None
        self.runner = runner
        self.dsn = dsn
        self.concurrency = concurrency
        self.heartbeat_s = heartbeat_s
        self.stalled_after_s = stalled_after_s
        self.sweep_s = sweep_s
        self.queue_name = queue
        self._procrastinate = procrastinate
        self.app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))
        retry = procrastinate.RetryStrategy(max_attempts=1000, wait=1, retry_exceptions={BusyRetry})
        self.task = self.app.task(name=TASK_NAME, queue=queue, retry=retry, pass_context=False)(self._run)
        self._tasks: list[asyncio.Task[None]] = []
        self._opened = False

    async def _run(self, job_id: str) -> None:
        if await self.runner.run(job_id) == "busy":
            raise BusyRetry(job_id)

    async def start(self) -> None:
        await self.app.open_async()
        self._opened = True
        await self._apply_schema()
        self._tasks.append(asyncio.create_task(self.app.run_worker_async(
            queues=[self.queue_name], concurrency=self.concurrency, install_signal_handlers=False,
            update_heartbeat_interval=self.heartbeat_s, stalled_worker_timeout=self.stalled_after_s,
            delete_jobs="successful", name=self.runner.owner,
            # on SIGTERM running jobs get one lease to finish; then they are cancelled (at the provider too)
            # and, their lease lapsing, another replica picks them up
            shutdown_graceful_timeout=self.runner.config.lease_s)))
        self._tasks.append(asyncio.create_task(self._sweep()))

    async def _apply_schema(self) -> None:
        """procrastinate's schema, once per database: replicas starting together serialise on a lock."""
        import psycopg

        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await conn.execute("SELECT pg_advisory_lock(hashtext('broker.gateway.procrastinate'))")
            try:
                cur = await conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL")
                row = await cur.fetchone()
                if not (row and row[0]):
                    await conn.execute(self.app.schema_manager.get_schema().encode())
            finally:
                await conn.execute("SELECT pg_advisory_unlock(hashtext('broker.gateway.procrastinate'))")

    async def enqueue(self, job_id: str) -> None:
        # The queueing lock keeps one waiting entry per job, so re-queueing (a replayed request, the sweep)
        # never doubles it; the row's lease keeps a second entry from running it twice anyway.
        try:
            await self.task.configure(queueing_lock=job_id).defer_async(job_id=job_id)
        except self._procrastinate.exceptions.AlreadyEnqueued:
            pass

    async def _sweep(self) -> None:
        """Retry the jobs of replicas whose heartbeat stopped (any replica may notice first)."""
        while True:
            await asyncio.sleep(self.sweep_s)
            try:
                stalled = await self.app.job_manager.get_stalled_jobs(
                    queue=self.queue_name, seconds_since_heartbeat=self.stalled_after_s)
                for job in stalled:
                    log.info("procrastinate job %s stalled (its replica stopped); retrying", job.id)
                    with contextlib.suppress(Exception):  # another replica retried it first
                        await self.app.job_manager.retry_job(job)
                # a job whose row was written by a replica that died before queueing it
                for job_id in await self._unqueued():
                    await self.enqueue(job_id)
                await self.runner.send_unsent_webhooks()
            except Exception as exc:
                log.warning("stalled-job sweep failed: %s", exc)

    async def _unqueued(self) -> list[str]:
        """Queued rows with no procrastinate entry waiting or running for them."""
        import time

        rows = await self.runner.jobs.db.fetchall(
            "SELECT g.id FROM gateway_jobs g WHERE g.state = 'queued' AND g.created_at < ? AND NOT EXISTS ("
            " SELECT 1 FROM procrastinate_jobs p WHERE p.queueing_lock = g.id AND p.status IN ('todo', 'doing'))"
            " ORDER BY g.created_at LIMIT 100", (time.time() - self.stalled_after_s,))
        return [r["id"] for r in rows]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._opened:
            await self.app.close_async()
            self._opened = False


def make_queue(runner: JobRunner, database_url: str, **kwargs: Any) -> JobQueue:
    from broker.gateway.db import is_postgres

    if is_postgres(database_url):
        return ProcrastinateQueue(runner, database_url, **kwargs)
    return InProcessQueue(runner, concurrency=kwargs.get("concurrency", 4))
