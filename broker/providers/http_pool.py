"""A pool of self-hosted workers behind one ``http`` endpoint: spread by queue depth, fail over inside the pool.

Each job goes to the worker with the shortest queue. A worker's queue is what its ``GET /ready`` says
(``running`` + ``waiting``: every client's jobs, not only ours), read at most every ``refresh_s``, and
never taken as less than the jobs this process has in flight there (a report from before our last
few submissions is stale). Ties go to the worker that has had fewest jobs from us.

A worker that cannot be reached, drops the connection before the result (killed mid-job), answers
busy (503) or rate-limits is left for this job, and the job goes to the next worker; one that cannot
be reached is also ejected for ``eject_s`` so new jobs avoid it. Only when every worker of the pool
has failed the job does the error reach the manager, which then fails over to other providers as
with any provider. Errors that would repeat anywhere (bad input, a wrong key, a job that failed in
the engine) are not retried. A stream fails over only before its first chunk: chunks already handed
to the caller cannot be taken back.

One URL behind a load balancer is a pool of one: the balancer spreads, we still fail over on 503.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.errors import BrokerError, EngineUnavailable, JobLost, ProviderError, ProviderUnavailable, RateLimited
from broker.providers.http import HTTPJobClient, safe_url

#: jobs whose route through the pool is remembered (``PoolClient.routes``)
ROUTES_KEPT = 1000
#: errors after which the same job may run on another worker of the pool
POOL_RETRYABLE: tuple[type[BrokerError], ...] = (ProviderUnavailable, JobLost, RateLimited, EngineUnavailable)


def _elsewhere(exc: BrokerError) -> bool:
    """Would another worker of the pool serve it? Not a body over the limit (413): every worker has one."""
    return not (isinstance(exc, ProviderError) and exc.retryable is False)


@dataclass
class PoolMember:
    client: HTTPJobClient
    #: jobs this process has sent there and not yet seen finish
    inflight: int = 0
    #: jobs sent there by this process, ever (ties, and tests of the spread)
    dispatched: int = 0
    #: running + waiting from its last /ready; None = never read
    reported_depth: int | None = None
    reported_at: float = -1e9
    ready: bool = True
    #: monotonic time before which new jobs avoid it (unreachable)
    down_until: float = 0.0
    last_error: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return safe_url(self.client.base_url).rstrip("/")

    def depth(self) -> int:
        return max(self.reported_depth or 0, self.inflight)


class WorkerPool:
    """The workers of one endpoint, and the choice of which one takes the next job."""

    def __init__(self, clients: Sequence[HTTPJobClient], *, refresh_s: float = 0.5, eject_s: float = 10.0) -> None:
        if not clients:
            raise ValueError("a worker pool needs at least one worker")
        self.members = [PoolMember(c) for c in clients]
        self.refresh_s = refresh_s
        self.eject_s = eject_s
        self._refreshing: asyncio.Future[Any] | None = None

    def __repr__(self) -> str:
        return f"<WorkerPool {', '.join(m.url for m in self.members)}>"

    # -- reading the workers' queues -----------------------------------------------------------
    async def refresh(self, *, force: bool = False) -> None:
        """Read /ready of every worker whose report is stale; concurrent callers share one round."""
        if self._refreshing is None or self._refreshing.done():
            now = time.monotonic()
            stale = [m for m in self.members if force or now - m.reported_at >= self.refresh_s]
            if not stale:
                return
            self._refreshing = asyncio.ensure_future(asyncio.gather(*(self._read(m) for m in stale)))
        await asyncio.shield(self._refreshing)

    async def _read(self, member: PoolMember) -> None:
        try:
            ready, info = await member.client.ready()
        except BrokerError as exc:
            member.ready, member.last_error = False, exc.message
            member.down_until = time.monotonic() + self.eject_s
            member.reported_at = time.monotonic()
            return
        member.ready, member.info = ready, info
        member.reported_depth = _int(info.get("running")) + _int(info.get("waiting"))
        member.reported_at = time.monotonic()
        if ready:
            member.down_until = 0.0
        else:
            member.last_error = str(info.get("error") or "not ready")

    # -- choosing --------------------------------------------------------------------------------
    async def choose(self, exclude: set[int]) -> PoolMember | None:
        """The least-loaded worker not in ``exclude`` (indices), preferring ready and reachable ones."""
        await self.refresh()
        now = time.monotonic()
        left = [(i, m) for i, m in enumerate(self.members) if i not in exclude]
        if not left:
            return None
        # Up and ready first; then those merely not ready; an ejected worker only when nothing else is left.
        ranked = sorted(left, key=lambda im: (im[1].down_until > now, not im[1].ready, im[1].depth(),
                                              im[1].dispatched, im[0]))
        return ranked[0][1]

    def index(self, member: PoolMember) -> int:
        return self.members.index(member)

    def failed(self, member: PoolMember, exc: BrokerError) -> None:
        member.last_error = exc.message
        if isinstance(exc, ProviderUnavailable) and exc.status_code is None:
            member.down_until = time.monotonic() + self.eject_s  # unreachable, not merely busy
            member.reported_at = -1e9  # read it again before trusting it

    async def aclose(self) -> None:
        for m in self.members:
            await m.client.aclose()


class PoolClient:
    """Looks like one ``HTTPJobClient`` to ``HTTPJob``; runs each job on the pool, failing over inside it."""

    def __init__(self, pool: WorkerPool, provider: str) -> None:
        self.pool = pool
        self.provider = provider
        #: the workers each recent job was sent to, in order (job id → URLs), the last ROUTES_KEPT jobs:
        #: what happened where, for reports and tests, without growing in a long-lived process
        self.routes: OrderedDict[str, list[str]] = OrderedDict()

    async def _next(self, job_id: str, tried: set[int], last: BrokerError | None) -> PoolMember:
        member = await self.pool.choose(tried)
        if member is None:
            if last is not None:
                raise last
            raise ProviderUnavailable(f"{self.provider}: no worker in the pool", provider=self.provider)
        tried.add(self.pool.index(member))
        route = self.routes.get(job_id)
        if route is None:
            route = self.routes[job_id] = []
            while len(self.routes) > ROUTES_KEPT:
                self.routes.popitem(last=False)
        route.append(member.url)
        return member

    async def run(self, payload: dict[str, Any]) -> dict[str, Any]:
        job_id, tried = str(payload.get("id")), set[int]()
        last: BrokerError | None = None
        while True:
            member = await self._next(job_id, tried, last)
            member.inflight += 1
            member.dispatched += 1
            try:
                return await member.client.run(payload)
            except POOL_RETRYABLE as exc:
                self.pool.failed(member, exc)
                if not _elsewhere(exc):
                    raise
                last = exc
            finally:
                member.inflight -= 1

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        job_id, tried = str(payload.get("id")), set[int]()
        last: BrokerError | None = None
        while True:
            member = await self._next(job_id, tried, last)
            member.inflight += 1
            member.dispatched += 1
            started = False
            try:
                async for item in member.client.stream(payload):
                    started = True
                    yield item
                return
            except POOL_RETRYABLE as exc:
                self.pool.failed(member, exc)
                if started or not _elsewhere(exc):
                    raise  # the caller has chunks from this worker: only the manager may start over
                last = exc
            finally:
                member.inflight -= 1

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        """Ready when any worker is; the report lists every worker (URLs without credentials)."""
        await self.pool.refresh(force=True)
        workers = [{"url": m.url, "ready": m.ready, "queue_depth": m.reported_depth, "inflight": m.inflight,
                    "dispatched": m.dispatched, **({"error": m.last_error} if not m.ready else {})}
                   for m in self.pool.members]
        ready = [w for w in workers if w["ready"]]
        if len(self.pool.members) == 1:  # one worker (or a load balancer): its own report, as before pools
            only = self.pool.members[0]
            return only.ready, {**only.info, "ready": only.ready, "workers": workers,
                                **({"error": only.last_error} if not only.ready else {})}
        info: dict[str, Any] = {"ready": bool(ready), "workers": workers,
                                "running": sum(_int(m.info.get("running")) for m in self.pool.members if m.ready),
                                "waiting": sum(_int(m.info.get("waiting")) for m in self.pool.members if m.ready)}
        if not ready:
            info["error"] = "; ".join(f"{w['url']}: {w.get('error', '')}" for w in workers)
        return bool(ready), info

    async def aclose(self) -> None:
        await self.pool.aclose()


def _int(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


__all__ = ["POOL_RETRYABLE", "PoolClient", "PoolMember", "WorkerPool"]
