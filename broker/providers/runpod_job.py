"""A RunPod job: its status words mapped onto the broker lifecycle, its stream, its output and errors."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from broker import wire
from broker.errors import (
    AuthenticationFailed,
    BadOutput,
    BrokerError,
    JobFailed,
    JobLost,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    error_from_dict,
)
from broker.media import Audio, AudioChunk
from broker.providers.base import Job, JobState, Output, Request

if TYPE_CHECKING:
    from broker.providers.runpod import RunPodProvider

log = logging.getLogger(__name__)

#: consecutive failed /status calls before we stop trusting the job is still alive
_MAX_STATUS_ERRORS = 5
#: longest we sleep on one 429 from /status or /stream before asking again
_MAX_BACKOFF_S = 10.0
_TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")


class RunPodJob(Job):
    """A job on RunPod: ``_refresh`` reads ``/status``; ``stream`` reads ``/stream``."""

    def __init__(self, provider: RunPodProvider, request: Request | None, job_id: str, streaming: bool) -> None:
        super().__init__(provider.name, job_id, request)
        self._p = provider
        self.streaming = streaming
        #: RunPod's own status word, as last seen
        self.remote_status = "IN_QUEUE"
        #: the last progress update the worker sent (renders report {"progress": 0.4})
        self.progress: Any = None
        self._submitted = time.monotonic()
        self._status_errors = 0
        self._cancel_requested = False

    # -- status ----------------------------------------------------------------------
    def apply(self, data: dict[str, Any]) -> None:
        """Move to the state a /status (or /run, /runsync, /stream) answer describes."""
        status = str(data.get("status", ""))
        self.remote_status = status or self.remote_status
        if status in ("IN_PROGRESS", "RUNNING"):
            self._set_state(JobState.RUNNING)
            if data.get("output") is not None:
                self.progress = data["output"]
            return
        if status not in _TERMINAL:
            return  # IN_QUEUE, or a word we do not know yet: keep polling
        self._backfill_running(data)
        self.billing = self._p.bill(data) or self.billing
        try:
            self._apply_end(status, data)
        finally:
            self.cancel_pending = False  # whatever we asked, RunPod says it is over

    def _apply_end(self, status: str, data: dict[str, Any]) -> None:
        if status == "COMPLETED":
            try:
                self._succeed(decode_output(data.get("output"), provider=self.provider))
            except BrokerError as exc:
                self._fail(exc)
        elif status == "FAILED":
            self._fail(runpod_error(data.get("error"), provider=self.provider, job_id=self.id))
        elif status == "CANCELLED":
            if self._cancel_requested:
                self._set_state(JobState.CANCELLED)
            else:
                self._fail(JobFailed(f"job {self.id} was cancelled on RunPod's side", provider=self.provider,
                                     job_id=self.id), JobState.CANCELLED)
        elif ("executionTime" in data or self.state == JobState.RUNNING) and not self._ttl_expired(data):
            self._fail(ProviderTimeout(
                f"job {self.id} ran past its execution timeout ({self._p.execution_timeout_s:g} s) and RunPod "
                "stopped it", provider=self.provider, job_id=self.id))
        elif "executionTime" in data or self.state == JobState.RUNNING:
            self._fail(ProviderTimeout(
                f"job {self.id} expired mid-run: it outlived its ttl ({self._ttl_s():g} s, queue and run time "
                "together), not its execution timeout (TIMED_OUT)", provider=self.provider, job_id=self.id))
        else:
            self._fail(ProviderUnavailable(
                f"job {self.id} expired in RunPod's queue: its ttl ({self._ttl_s():g} s) passed before a worker "
                "took it (TIMED_OUT)", provider=self.provider, job_id=self.id))

    def _ttl_s(self) -> float:
        return self._p.policy()["ttl"] / 1000

    def _ttl_expired(self, data: dict[str, Any]) -> bool:
        """TIMED_OUT says not which limit was hit: the run time tells (short of executionTimeout = the ttl)."""
        exec_ms = data.get("executionTime")
        if not isinstance(exec_ms, int | float):
            return False
        return float(exec_ms) / 1000 < self._p.policy()["executionTimeout"] / 1000 * 0.95

    def _backfill_running(self, data: dict[str, Any]) -> None:
        # A job that went from queued to done between two polls still spent delayTime queued.
        delay = data.get("delayTime")
        if "running" not in self.timestamps and isinstance(delay, int | float):
            self.timestamps["running"] = self.timestamps["queued"] + float(delay) / 1000

    async def _refresh(self) -> None:
        try:
            data = await self._p.call("GET", f"status/{self.id}", job_id=self.id)
        except RateLimited as exc:
            await asyncio.sleep(min(exc.retry_after or 1.0, _MAX_BACKOFF_S))
            return
        except (JobLost, AuthenticationFailed) as exc:
            self._fail(exc, JobState.LOST if isinstance(exc, JobLost) else JobState.FAILED)
            return
        except ProviderError as exc:
            self._status_errors += 1
            if self._status_errors >= _MAX_STATUS_ERRORS:
                self._fail(exc, JobState.LOST)
            return
        self._status_errors = 0
        self.apply(data)
        await self._enforce_queue_timeout()

    async def _enforce_queue_timeout(self) -> None:
        limit = self._p.queue_timeout_s
        if limit is None or self.state != JobState.QUEUED:
            return
        waited = time.monotonic() - self._submitted
        if waited <= limit:
            return
        # Nobody picked it up in time: take it back so it cannot start (and bill) after we moved on.
        # If RunPod refuses the cancel now, the job still fails over but stays ``cancel_pending``:
        # whoever holds it keeps asking (``Job.cancel``) until RunPod confirms or the ttl passes.
        confirmed = False
        try:
            confirmed = await self._cancel()
        except BrokerError as exc:
            log.warning("could not cancel RunPod job %s yet: %s", self.id, exc.message)
        if self.remote_status in ("COMPLETED", "FAILED", "TIMED_OUT"):
            return  # it started and ended meanwhile; apply() recorded how
        self.cancel_pending = not confirmed
        self.error = ProviderUnavailable(
            f"job {self.id} waited {waited:.0f} s in RunPod's queue (limit {limit:g} s); "
            + ("cancelled it" if confirmed else "its cancel is not confirmed yet"),
            provider=self.provider, job_id=self.id)
        self._set_state(JobState.CANCELLED)

    async def _cancel(self) -> bool:
        """One /cancel; True once RunPod reports the job ended (then /status has its timings and bill)."""
        self._cancel_requested = True
        try:
            reply = await self._p.call("POST", f"cancel/{self.id}", job_id=self.id)
        except JobLost:
            return True  # RunPod no longer knows it: expired or purged, it cannot run
        if str(reply.get("status", "")) not in _TERMINAL:
            return False
        try:
            self.apply(await self._p.call("GET", f"status/{self.id}", job_id=self.id))
        except BrokerError:
            self.apply(reply)
        return True

    # -- streaming -----------------------------------------------------------------------
    async def stream(self) -> AsyncIterator[AudioChunk]:
        if not self.streaming:
            async for chunk in super().stream():
                yield chunk
            return
        received = 0
        idle_polls = 0
        while not self.state.terminal:
            try:
                data = await self._p.call("GET", f"stream/{self.id}", job_id=self.id)
            except RateLimited as exc:
                await asyncio.sleep(min(exc.retry_after or 1.0, _MAX_BACKOFF_S))
                continue
            except JobLost as exc:
                self._fail(exc, JobState.LOST)
                break
            items = data.get("stream") or []
            for item in items:
                out = item.get("output") if isinstance(item, dict) else None
                index, final, audio, text = wire.decode_chunk(out, provider=self.provider)
                received += 1
                yield AudioChunk(audio, index, final=final, text=text)
            status = str(data.get("status", ""))
            if status in ("IN_PROGRESS", "RUNNING"):
                self._set_state(JobState.RUNNING)
            if items:
                idle_polls = 0
                continue
            if status in ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"):
                await self.wait()  # the output, error and timings live on /status
                break
            await self._enforce_queue_timeout()
            schedule = self.poll_schedule
            await asyncio.sleep(schedule[min(idle_polls, len(schedule) - 1)])
            idle_polls += 1
        if self.error is not None:
            raise self.error
        if received == 0 and isinstance(self.output, Audio):
            # A plain (non-generator) handler streams nothing; its whole result is the one chunk.
            yield AudioChunk(self.output, 0, final=True, text=getattr(self.request, "text", None))


# -- output and error decoding ----------------------------------------------------------
def decode_output(output: Any, *, provider: str = "runpod") -> Output:
    """The job's output: a wire result, or (generator handler) the aggregate list of what it yielded."""
    if isinstance(output, list):
        chunks = [o for o in output if isinstance(o, dict) and "chunk" in o]
        if chunks:
            decoded = sorted((wire.decode_chunk(c, provider=provider) for c in chunks), key=lambda c: c[0])
            return Audio.concat([audio for _, _, audio, _ in decoded])
        if len(output) == 1:
            return wire.decode_result(output[0], provider=provider)
        raise BadOutput(f"RunPod job output is a list of {len(output)} items, none of them a result",
                        provider=provider)
    if output is None:
        raise BadOutput("RunPod reported the job COMPLETED without output", provider=provider)
    return wire.decode_result(output, provider=provider)


def runpod_error(error: Any, *, provider: str = "runpod", job_id: str | None = None) -> BrokerError:
    """A readable, typed error from a FAILED job's ``error`` field (often JSON inside a string)."""
    if isinstance(error, str):
        try:
            error = json.loads(error)
        except ValueError:
            pass
    if isinstance(error, dict):
        if "type" in error and "message" in error:  # our handler's typed error
            return error_from_dict(error, provider=provider)
        if "error_message" in error or "error_type" in error:  # the SDK caught an exception in the handler
            kind = str(error.get("error_type", "Exception")).removeprefix("<class '").removesuffix("'>")
            return JobFailed(f"the RunPod handler raised {kind}: {error.get('error_message', '')}",
                             provider=provider, job_id=job_id)
        return JobFailed(f"RunPod job failed: {json.dumps(error)[:500]}", provider=provider, job_id=job_id)
    if not error:
        return JobFailed("RunPod reported the job FAILED without an error message", provider=provider,
                         job_id=job_id)
    # A generator handler's exception arrives as "handler: <message> \ntraceback: ..."
    text = str(error).split("\ntraceback:")[0].strip()
    return JobFailed(f"RunPod job failed: {text[:1000]}", provider=provider, job_id=job_id)
