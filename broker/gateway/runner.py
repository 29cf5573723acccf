"""One gateway job through the manager: claim it, run it, store the output, record the outcome, notify.

Whichever replica runs a job holds a lease on its row and renews it while the job runs. A renewal that
fails means the job was cancelled (``DELETE``) or taken over: the manager's job is cancelled at once,
which cancels it at the provider. A replica that dies stops renewing; once the lease lapses another
replica may claim the job and run it again — the ledger shows the abandoned attempt, and for long work
the journal makes the rerun redo only missing pieces. The output is stored and recorded on the row
before the ledger settles the attempt that made it (the manager's ``on_output`` sink), so a job that
was finished and billed is never run again: the replica that claims it finishes it from the kept output.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from broker import wire
from broker.errors import BrokerError, InvalidRequest
from broker.gateway.jobs import JobRow, JobStore
from broker.gateway.outputs import OutputStore
from broker.gateway.tenants import KeyStore
from broker.gateway.webhooks import deliver
from broker.media import Audio, Video
from broker.money.budget import TenantBudget
from broker.types import SpeechRequest, build

log = logging.getLogger("broker.gateway.runner")

AUDIO_FORMATS = {"wav": "audio/wav", "flac": "audio/flac"}
#: what a book can be written as (the long-work writer's formats)
LONG_FORMATS = {**AUDIO_FORMATS, "mp3": "audio/mpeg", "m4a": "audio/mp4", "m4b": "audio/mp4"}
KINDS = ("speech", "render", "long_speech")
_LONG_FIELDS = ("speaker", "engine", "temperature", "topk")
JOB_SHAPE = {"kind": "speech", "input": {"text": "Hello.", "speaker": 0}}


class LeaseLost(Exception):
    """The job was cancelled or another replica holds it now."""


def decode_job_request(body: dict[str, Any], *, fetch: Any = None) -> Any:
    """The broker request inside a job body (raises ``InvalidRequest`` naming the field).

    ``fetch(url) -> bytes`` fetches media given by URL; without one (a job being run: its media was
    fetched when it was accepted, see ``broker.gateway.media``) a URL is refused."""
    kind = body.get("kind")
    if kind not in KINDS:
        raise InvalidRequest("kind", f"must be one of {', '.join(KINDS)}; got {kind!r} (a job looks like "
                             f"{json.dumps(JOB_SHAPE)})")
    inp = body.get("input")
    if not isinstance(inp, dict):
        raise InvalidRequest("input", "must be a JSON object with the request fields (text, speaker, ...), as in "
                             f"{json.dumps(JOB_SHAPE)}")
    if kind == "long_speech":
        return decode_long_request(inp)
    return wire.decode_request({"v": wire.WIRE_VERSION, "task": kind, "input": inp}, fetch=fetch)


@dataclass
class LongRequest:
    """A book: chapters and the speech settings every piece shares."""

    chapters: list[Any]
    fields: dict[str, Any]


def decode_long_request(inp: dict[str, Any]) -> LongRequest:
    """``{"text": "…"}`` (chapters from "Chapter N" lines / Markdown headings) or ``{"chapters": [{title, text}]}``."""
    from broker.longform import Chapter, as_chapters

    fields = {k: inp[k] for k in _LONG_FIELDS if inp.get(k) is not None}
    build(SpeechRequest, text="check", **fields)  # bad settings are refused now, naming the field
    unknown = set(inp) - {"text", "chapters", *_LONG_FIELDS}
    if unknown:
        raise InvalidRequest("input", f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    if "chapters" in inp:
        raw = inp["chapters"]
        if not isinstance(raw, list) or not raw:
            raise InvalidRequest("input.chapters", "must be a non-empty list of {title, text}")
        chapters = []
        for i, c in enumerate(raw):
            if not isinstance(c, dict) or not isinstance(c.get("text"), str) or not c["text"].strip():
                raise InvalidRequest(f"input.chapters.{i}", "must be {\"title\": …, \"text\": \"…\"} with text")
            chapters.append(Chapter(str(c.get("title") or f"Chapter {i + 1}"), c["text"]))
        return LongRequest(chapters, fields)
    text = inp.get("text")
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequest("input.text", "is required: the book's text (or give input.chapters)")
    chapters = as_chapters(text)
    if not chapters:
        raise InvalidRequest("input.text", "has nothing to speak")
    return LongRequest(chapters, fields)


@dataclass
class RunnerConfig:
    lease_s: float = 30.0
    webhook_secret: str | None = None
    webhook_attempts: int = 6
    webhook_backoff_s: float = 0.5


class JobRunner:
    def __init__(self, manager: Any, jobs: JobStore, keys: KeyStore, outputs: OutputStore,
                 config: RunnerConfig | None = None, *, owner: str | None = None) -> None:
        self.manager = manager
        self.jobs = jobs
        self.keys = keys
        self.outputs = outputs
        self.config = config or RunnerConfig()
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.latencies: list[float] = []
        self.running = 0
        #: fraction done of the long jobs running here (sent with each lease renewal)
        self._progress: dict[str, float] = {}
        #: notified whenever a job this replica ran finishes (``GET /v1/jobs/{id}?wait=`` listens)
        self.finished = asyncio.Condition()

    async def run(self, job_id: str) -> str:
        """Run ``job_id`` if it can be claimed; returns what happened ("done", "busy" or "skipped")."""
        job = await self.jobs.claim(job_id, self.owner, self.config.lease_s)
        if job is None:
            current = await self.jobs.get(job_id)
            if current is None or current.terminal:
                if current is not None and current.webhook_state == "pending":
                    await self._notify(current)
                return "skipped"
            return "busy"  # held by a live replica
        self.running += 1
        try:
            await self._run_claimed(job)
        finally:
            self.running -= 1
        return "done"

    async def _run_claimed(self, job: JobRow) -> None:
        t0 = time.monotonic()
        body = job.request
        options = body.get("options") or {}
        task = asyncio.current_task()
        assert task is not None
        keeper = asyncio.create_task(self._keep_lease(job.id, task))
        report = None
        try:
            if job.output_key is not None:
                # The replica that ran this job kept its output and died before recording the end: the
                # provider's work is done and billed, so finish the job from what was kept.
                await self._finish_kept(job)
            else:
                request = decode_job_request(body)
                tenant = await self._budget_of(job.tenant)
                if isinstance(request, LongRequest):
                    await self._run_long(job, request, options, tenant)
                else:  # not a return: the end of the job (waiters, webhook) is the same for both
                    kept: list[tuple[str, str, int]] = []
                    taken: list[bool] = []

                    async def keep(out: Audio | Video) -> None:
                        """Store the output and record it on the row before the manager settles the attempt."""
                        if taken:
                            return  # a hedge that finished too: the first output is the job's
                        taken.append(True)  # before the store's await, so a hedge finishing meanwhile is ignored
                        kept.append(await self._store(job.id, out, options))
                        key, mime, size = kept[0]
                        await self.jobs.keep_output(job.id, self.owner, output_key=key, output_mime=mime,
                                                    output_bytes=size)

                    run = asyncio.ensure_future(self.manager.arun(
                        request, deadline_s=options.get("deadline_s"), max_usd=options.get("max_usd"), job_id=job.id,
                        tenant=tenant, on_output=keep))
                    try:
                        out = await run
                    finally:
                        report = getattr(self.manager, "last_report", None)
                    key, mime, size = kept[0] if kept else await self._store(job.id, out, options)
                    report = out.report or report
                    await self.jobs.finish(job.id, self.owner, state="succeeded", cost_usd=_cost(report),
                                           provider=report.provider if report else None, attempts=_attempts(report),
                                           output_key=key, output_mime=mime, output_bytes=size)
        except asyncio.CancelledError:
            if keeper.done() and isinstance(keeper.exception(), LeaseLost):
                log.info("job %s: cancelled or taken over; stopped", job.id)
                return
            raise
        except BrokerError as exc:
            await self.jobs.finish(job.id, self.owner, state="failed", cost_usd=_cost(report),
                                   provider=report.provider if report else None, attempts=_attempts(report),
                                   error=exc.to_dict())
        except Exception as exc:  # a bug must still end the job, typed, never a stuck "running"
            log.exception("job %s: internal error", job.id)
            await self.jobs.finish(job.id, self.owner, state="failed", cost_usd=_cost(report), provider=None,
                                   attempts=_attempts(report),
                                   error={"type": "InternalError", "message": type(exc).__name__})
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, LeaseLost):
                await keeper
        self.latencies.append(time.monotonic() - t0)
        del self.latencies[:-1000]
        async with self.finished:
            self.finished.notify_all()
        final = await self.jobs.get(job.id)
        if final is not None and final.terminal and final.webhook_url:
            await self._notify(final)

    async def _keep_lease(self, job_id: str, task: asyncio.Task[Any]) -> None:
        interval = max(0.2, self.config.lease_s / 3)
        while True:
            await asyncio.sleep(interval)
            if not await self.jobs.renew(job_id, self.owner, self.config.lease_s, self._progress.get(job_id)):
                task.cancel()
                raise LeaseLost(job_id)

    async def _budget_of(self, tenant_id: str) -> TenantBudget:
        """The tenant's budgets as they are now (a key's row; none for the open tenant or a removed key)."""
        tenant = await self.keys.get(tenant_id)
        return tenant.budget() if tenant is not None else TenantBudget(tenant_id)

    async def _run_long(self, job: JobRow, request: LongRequest, options: dict[str, Any],
                        tenant: TenantBudget) -> None:
        """A book through the long-work scheduler; its journal makes a rerun (another replica) redo only
        missing pieces. Written where ``GET …/output`` can follow it as it grows."""
        import tempfile
        from pathlib import Path

        from broker.gateway.outputs import DirectoryOutputs
        from broker.longform import LongJob

        fmt = str(options.get("output_format") or "wav")
        local = isinstance(self.outputs, DirectoryOutputs)
        folder = self.outputs.root if isinstance(self.outputs, DirectoryOutputs) else Path(tempfile.mkdtemp())
        key = f"{job.id}.{fmt}"

        def progress(p: Any) -> None:
            self._progress[job.id] = p.done / max(1, p.total)

        long_job = LongJob(self.manager, request.chapters, output=folder / key, max_usd=options.get("max_usd"),
                           deadline_s=options.get("deadline_s"), on_progress=progress,
                           command=f"gateway job {job.id}", tenant=tenant, **request.fields)
        try:
            try:
                result = await long_job.run()
            finally:
                long_job.close()
                self._progress.pop(job.id, None)
            path = folder / key
            size = path.stat().st_size
            if not local:
                await asyncio.to_thread(self.outputs.put_file, key, path, LONG_FORMATS[fmt])
        finally:
            if not local:  # the book's local copy, whether it was uploaded or not
                shutil.rmtree(folder, ignore_errors=True)
        top = max(result.providers.items(), key=lambda kv: kv[1])[0] if result.providers else None
        await self.jobs.finish(job.id, self.owner, state="succeeded", cost_usd=result.cost_usd, provider=top,
                               attempts=[{"pieces": result.pieces, "pieces_run": result.pieces_run,
                                          "pieces_reused": result.pieces_reused, "providers": result.providers}],
                               output_key=key, output_mime=LONG_FORMATS[fmt], output_bytes=size)

    async def _store(self, job_id: str, out: Audio | Video, options: dict[str, Any]) -> tuple[str, str, int]:
        """Encode ``out`` and put it in the output store; returns (key, mime, bytes)."""
        key, mime, data = self._encode(job_id, out, options)
        await asyncio.to_thread(self.outputs.put, key, data, mime)  # a bucket is a network call
        return key, mime, len(data)

    async def _finish_kept(self, job: JobRow) -> None:
        """Finish a job whose output an earlier run kept; its cost and attempts come from the ledger (that
        run's report died with its replica). An attempt the dead replica had not settled yet shows as
        running at $0 until the ledger's reconciler settles it."""
        ledger = getattr(self.manager, "ledger", None)
        rows = [] if ledger is None else await asyncio.to_thread(ledger.attempts, job_id=job.id)
        # the attempt that made the output: settled, or still open if its replica died before the settle landed
        billed = [r for r in rows if r["status"] == "succeeded"] or [r for r in rows if r["provider_job_id"]]
        attempts = [{"provider": r["provider"], "outcome": r["status"],
                     "seconds": round(max(0.0, (r["ended_at"] or r["started_at"]) - r["started_at"]), 4),
                     "cost_usd": round(r["cost_usd"] or 0.0, 8), "error_class": r["error_class"],
                     "message": r["message"]} for r in rows]
        log.info("job %s: its output was kept by an earlier run; finished without running it again", job.id)
        await self.jobs.finish(job.id, self.owner, state="succeeded", cost_usd=sum(a["cost_usd"] for a in attempts),
                               provider=billed[-1]["provider"] if billed else None, attempts=attempts,
                               output_key=job.output_key, output_mime=job.output_mime,
                               output_bytes=job.output_bytes)

    def _encode(self, job_id: str, out: Audio | Video, options: dict[str, Any]) -> tuple[str, str, bytes]:
        if isinstance(out, Video):
            return f"{job_id}.mp4", "video/mp4", out.data
        fmt = str(options.get("output_format") or "wav")
        return f"{job_id}.{fmt}", AUDIO_FORMATS[fmt], out.to_bytes(fmt)

    async def _notify(self, job: JobRow) -> None:
        if not job.webhook_url or job.webhook_state not in ("pending", "sending"):
            return
        secret = self.config.webhook_secret
        tenant = await self.keys.get(job.tenant)
        if tenant is not None and tenant.webhook_secret:
            secret = tenant.webhook_secret
        if not secret:
            log.warning("job %s: no webhook secret configured; webhook not sent", job.id)
            await self.jobs.set_webhook_state(job.id, "failed")
            return
        # Hold the delivery for one lease, renewed before each try; a replica that dies holding it lets
        # another replica's sweep send it once the hold lapses.
        hold = self.config.lease_s
        if not await self.jobs.claim_webhook(job.id, hold):
            return

        async def renew() -> None:
            await self.jobs.hold_webhook(job.id, hold)

        ok = await deliver(job.webhook_url, secret, {"id": job.id, **job.view()},
                           attempts=self.config.webhook_attempts, backoff_s=self.config.webhook_backoff_s,
                           timeout_s=max(1.0, min(10.0, hold / 2)), before_attempt=renew)
        await self.jobs.set_webhook_state(job.id, "sent" if ok else "failed")

    async def send_unsent_webhooks(self) -> None:
        """Deliver what a dead replica left undelivered (every replica's queue sweep calls this)."""
        for job_id in await self.jobs.unsent_webhooks(older_than_s=self.config.lease_s):
            job = await self.jobs.get(job_id)
            if job is not None:
                await self._notify(job)


def _cost(report: Any) -> float:
    return float(report.cost_usd) if report is not None else 0.0


def _attempts(report: Any) -> list[dict[str, Any]]:
    if report is None:
        return []
    return [{"provider": a.provider, "outcome": a.outcome, "seconds": round(a.seconds, 4),
             "cost_usd": round(a.cost_usd, 8), "error_class": a.error_class, "message": a.message}
            for a in report.attempts]
