"""The emulated RunPod endpoint's job book: queue, states, timings, expiry. No HTTP in here.

All methods run on the emulator's event loop; waiters (job-take long-polls, /runsync) sleep on
one ``asyncio.Condition`` that every change notifies.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

IN_QUEUE, IN_PROGRESS = "IN_QUEUE", "IN_PROGRESS"
COMPLETED, FAILED, CANCELLED, TIMED_OUT = "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED, TIMED_OUT})

#: RunPod's defaults (docs.runpod.io/serverless/endpoints/send-requests, 2026-11-23)
DEFAULT_TTL_S = 24 * 3600.0
DEFAULT_EXECUTION_TIMEOUT_S = 600.0
RUN_RETENTION_S = 30 * 60.0
RUNSYNC_RETENTION_S = 60.0


@dataclass
class Faults:
    """Knobs that make the emulated endpoint misbehave the ways a real one does."""

    #: extra seconds a (re)started worker waits before it is handed jobs
    cold_start_s: float = 0.0
    #: share of jobs that FAIL as if the handler raised
    failure_rate: float = 0.0
    #: workers are never handed jobs: everything stays IN_QUEUE
    stuck: bool = False
    #: share of jobs whose worker process is killed mid-job
    crash_rate: float = 0.0
    crash_after_s: float = 0.3
    #: the next N calls to the hosted API are answered 429 with Retry-After
    rate_limit_burst: int = 0
    retry_after_s: float = 1.0
    #: overrides every job's ttl (seconds), so jobs expire in the queue or mid-run
    ttl_s: float | None = None
    #: every hosted-API call is answered 401
    reject_auth: bool = False
    #: overrides how long finished jobs stay readable (30 min for /run, 1 min for /runsync)
    result_retention_s: float | None = None
    #: start a new worker after one dies
    restart_workers: bool = True
    #: the next N calls to /cancel are refused with ``cancel_refusal_status`` (429 carries Retry-After)
    cancel_refusals: int = 0
    cancel_refusal_status: int = 429
    #: how RunPod bills a worker's idle tail: each job that ran is charged this many seconds after it
    idle_timeout_s: float = 5.0

    def update(self, **changes: Any) -> None:
        for key, value in changes.items():
            if not hasattr(self, key):
                raise KeyError(f"unknown fault {key!r}; known: {', '.join(self.__dataclass_fields__)}")
            setattr(self, key, value)


@dataclass
class EmulatedJob:
    id: str
    input: Any
    created: float
    ttl_s: float
    execution_timeout_s: float
    retention_s: float
    status: str = IN_QUEUE
    started: float | None = None
    finished: float | None = None
    worker_id: str | None = None
    output: Any = None
    error: Any = None
    progress: Any = None
    #: every progress update the worker sent, in order
    progress_log: list[Any] = field(default_factory=list)
    stream: list[Any] = field(default_factory=list)
    stream_cursor: int = 0
    retries: int = 0
    #: worker start-up this job waited through (it was the first job of a freshly started worker)
    cold_start_s: float = 0.0

    def billed_seconds(self, idle_timeout_s: float) -> float:
        """What RunPod bills for this job: from the worker's start (when this job woke it) through the
        run and the idle timeout, rounded up to the second (docs.runpod.io/pricing/serverless,
        read 2026-12-01). A job cancelled or expired before a worker took it bills nothing."""
        if self.started is None:
            return 0.0
        end = self.finished if self.finished is not None else time.monotonic()
        return float(math.ceil(self.cold_start_s + (end - self.started) + idle_timeout_s - 1e-9))

    def status_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.started is not None:
            out["delayTime"] = _ms(self.started - self.created)
            if self.finished is not None:
                out["executionTime"] = _ms(self.finished - self.started)
        if self.worker_id and self.started is not None:
            out["workerId"] = self.worker_id
        if self.status == IN_PROGRESS and self.progress is not None:
            out["output"] = self.progress
        elif self.status in (COMPLETED, FAILED) and self.output is not None:
            out["output"] = self.output
        if self.status == FAILED:
            out["error"] = self.error
        return out


class JobBook:
    """Jobs of one emulated endpoint (plus any endpoints created through the REST routes: one queue)."""

    def __init__(self, faults: Faults, seed: int = 0) -> None:
        self.faults = faults
        self.jobs: dict[str, EmulatedJob] = {}
        self.queue: deque[str] = deque()
        self.changed = asyncio.Condition()
        self.counts = {"completed": 0, "failed": 0, "retried": 0}
        #: job ids each worker must stop (delivered through its job-stop long-poll)
        self.stop_signals: dict[str, list[str]] = {}
        self.random = random.Random(seed)

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def wait_changed(self, deadline: float) -> bool:
        """Inside ``async with self.changed``: wait for the next change. False once ``deadline``
        (a ``time.monotonic()`` instant) has passed, so long-polls end on time."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            await asyncio.wait_for(self.changed.wait(), remaining)
        except TimeoutError:
            return False
        return True

    # -- the hosted side -----------------------------------------------------------
    def create(self, job_input: Any, policy: dict[str, Any] | None, *, sync: bool) -> EmulatedJob:
        policy = policy or {}
        ttl = policy.get("ttl")
        execution = policy.get("executionTimeout")
        job = EmulatedJob(
            id=("sync-" if sync else "") + f"{uuid.uuid4()}-u1",
            input=job_input,
            created=time.monotonic(),
            ttl_s=float(ttl) / 1000 if ttl else DEFAULT_TTL_S,
            execution_timeout_s=float(execution) / 1000 if execution else DEFAULT_EXECUTION_TIMEOUT_S,
            retention_s=RUNSYNC_RETENTION_S if sync else RUN_RETENTION_S,
        )
        self.jobs[job.id] = job
        self.queue.append(job.id)
        return job

    def cancel(self, job: EmulatedJob) -> None:
        if job.status == IN_QUEUE:
            self.queue.remove(job.id)
        elif job.status == IN_PROGRESS and job.worker_id:
            self.stop_signals.setdefault(job.worker_id, []).append(job.id)
        else:
            return
        self._finish(job, CANCELLED)

    def retry(self, job: EmulatedJob) -> bool:
        if job.status not in (FAILED, TIMED_OUT):
            return False
        job.status, job.output, job.error, job.progress = IN_QUEUE, None, None, None
        job.started = job.finished = job.worker_id = None
        job.stream, job.stream_cursor = [], 0
        job.retries += 1
        self.counts["retried"] += 1
        self.queue.append(job.id)
        return True

    def purge(self) -> int:
        removed = len(self.queue)
        for job_id in self.queue:
            self.jobs.pop(job_id, None)
        self.queue.clear()
        return removed

    def new_stream_items(self, job: EmulatedJob) -> list[dict[str, Any]]:
        items = [{"output": o} for o in job.stream[job.stream_cursor:]]
        job.stream_cursor = len(job.stream)
        return items

    def health(self) -> dict[str, int]:
        return {
            "completed": self.counts["completed"],
            "failed": self.counts["failed"],
            "inProgress": sum(1 for j in self.jobs.values() if j.status == IN_PROGRESS),
            "inQueue": len(self.queue),
            "retried": self.counts["retried"],
        }

    # -- the worker side -------------------------------------------------------------
    def take(self, worker_id: str, count: int, cold_start_s: float = 0.0
             ) -> tuple[list[EmulatedJob], list[EmulatedJob]]:
        """Hand up to ``count`` queued jobs to a worker; returns (taken, ones the crash fault picked).
        ``cold_start_s``: the worker's start-up, billed to the first job it takes."""
        taken: list[EmulatedJob] = []
        doomed: list[EmulatedJob] = []
        while self.queue and len(taken) < count:
            job = self.jobs[self.queue.popleft()]
            job.status, job.started, job.worker_id = IN_PROGRESS, time.monotonic(), worker_id
            job.cold_start_s, cold_start_s = min(cold_start_s, job.started - job.created), 0.0
            if self.random.random() < self.faults.failure_rate:
                self.fail_like_sdk(job, worker_id)
                continue
            if self.random.random() < self.faults.crash_rate:
                doomed.append(job)
            taken.append(job)
        return taken, doomed

    def fail_like_sdk(self, job: EmulatedJob, worker_id: str) -> None:
        """FAILED with the error the runpod SDK reports when a handler raises (JSON in a string)."""
        job.error = json.dumps({
            "error_type": "<class 'RuntimeError'>",
            "error_message": "emulated handler failure (failure_rate fault)",
            "error_traceback": "Traceback (most recent call last):\nRuntimeError: emulated handler failure",
            "hostname": "emulated",
            "worker_id": worker_id,
            "runpod_version": "emulated",
        })
        self._finish(job, FAILED)

    def done(self, job: EmulatedJob, body: dict[str, Any]) -> None:
        """A worker's job-done post: progress while running, else the result."""
        if job.status != IN_PROGRESS:
            return  # cancelled or timed out meanwhile; late results are dropped, as RunPod does
        if body.get("status") == IN_PROGRESS:
            job.progress = body.get("output")
            job.progress_log.append(job.progress)
            return
        job.output = body.get("output")
        if body.get("error"):
            job.error = body["error"]
            self._finish(job, FAILED)
        else:
            self._finish(job, COMPLETED)

    def streamed(self, job: EmulatedJob, body: dict[str, Any]) -> None:
        if job.status == IN_PROGRESS and "output" in body:
            job.stream.append(body["output"])

    def worker_died(self, worker_id: str, code: int | None) -> list[EmulatedJob]:
        lost = [j for j in self.jobs.values() if j.status == IN_PROGRESS and j.worker_id == worker_id]
        for job in lost:
            job.error = f"worker {worker_id} exited unexpectedly (exit code {code}) while running the job"
            self._finish(job, FAILED)
        self.stop_signals.pop(worker_id, None)
        return lost

    # -- time ------------------------------------------------------------------------
    def expire(self) -> None:
        """TIMED_OUT past ttl or execution timeout; forget finished jobs past their retention."""
        now = time.monotonic()
        for job in list(self.jobs.values()):
            ttl = self.faults.ttl_s if self.faults.ttl_s is not None else job.ttl_s
            if job.status == IN_QUEUE and now - job.created > ttl:
                self.queue.remove(job.id)
                self._finish(job, TIMED_OUT)
            elif job.status == IN_PROGRESS and job.started is not None and (
                now - job.started > job.execution_timeout_s or now - job.created > ttl
            ):
                if job.worker_id:
                    self.stop_signals.setdefault(job.worker_id, []).append(job.id)
                self._finish(job, TIMED_OUT)
            elif job.status in TERMINAL and job.finished is not None:
                keep = self.faults.result_retention_s
                if now - job.finished > (keep if keep is not None else job.retention_s):
                    del self.jobs[job.id]

    def _finish(self, job: EmulatedJob, status: str) -> None:
        job.status = status
        job.finished = time.monotonic()
        if status == COMPLETED:
            self.counts["completed"] += 1
        elif status in (FAILED, TIMED_OUT):
            self.counts["failed"] += 1


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))
