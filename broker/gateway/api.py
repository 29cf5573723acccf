"""The HTTP job API (FastAPI). Routes are thin: parse and check, then the job table, the queue, the manager.

Every request body is read by hand, after authentication and with a size cap, so an unknown key is a
401 before any parsing, an oversized body a 413 before it is all in memory, and every malformed input a
typed 4xx naming the field — never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import iterate_in_threadpool

from broker.errors import BrokerError, InvalidRequest
from broker.gateway import metrics
from broker.gateway.jobs import STATES, IdempotencyConflict, JobStore
from broker.gateway.media import MediaUrls
from broker.gateway.outputs import OutputStore
from broker.gateway.queues import JobQueue
from broker.gateway.runner import AUDIO_FORMATS, LONG_FORMATS, JobRunner, LongRequest
from broker.gateway.tenants import OPEN_TENANT, KeyStore, Tenant
from broker.money.budget import DAY_S, MONTH_S

STATIC = Path(__file__).with_name("static")

JOB_EXAMPLES = {
    "speech": {"summary": "Speech", "value": {
        "kind": "speech", "input": {"text": "Chapter one. It was a bright cold day.", "speaker": 0},
        "options": {"output_format": "wav", "max_usd": 0.05}}},
    "book": {"summary": "A book, split across workers and stitched in order", "value": {
        "kind": "long_speech", "input": {"chapters": [{"title": "One", "text": "It began. Then it went on."},
                                                      {"title": "Two", "text": "And it ended."}]},
        "options": {"output_format": "m4b"}}},
    "render": {"summary": "Talking head from text", "value": {
        "kind": "render", "input": {"text": "Hi there!", "fps": 25, "size": 512}}},
}
JOB_SCHEMA = {
    "type": "object", "required": ["kind", "input"],
    "properties": {
        "kind": {"type": "string", "enum": ["speech", "render", "long_speech"]},
        "input": {"type": "object", "description": "the request fields of the Python API: text, speaker, "
                  "max_length_ms, engine, context; for renders audio, avatar (MEDIA: {b64|url, mime}), "
                  "avatar_preset, mouth_box, fps, size"},
        "options": {"type": "object", "properties": {
            "deadline_s": {"type": "number", "exclusiveMinimum": 0},
            "max_usd": {"type": "number", "minimum": 0},
            "output_format": {"type": "string", "enum": list(LONG_FORMATS)}}},
        "webhook_url": {"type": "string", "format": "uri"},
    },
}


class HTTPError(Exception):
    def __init__(self, status: int, kind: str, message: str, *, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.field, self.headers = status, kind, message, field, headers

    def response(self) -> JSONResponse:
        err: dict[str, Any] = {"type": self.kind, "message": self.message}
        if self.field:
            err["field"] = self.field
        return JSONResponse({"error": err}, status_code=self.status, headers=self.headers)


@dataclass
class Gateway:
    manager: Any
    jobs: JobStore
    keys: KeyStore
    outputs: OutputStore
    runner: JobRunner
    queue: JobQueue
    max_body_bytes: int = 32 * 1024 * 1024
    #: no keys configured and bound to loopback: every caller is the one local tenant
    open_access: bool = True
    #: fetches media given by URL when a job is accepted (default rules: https, public addresses)
    media: MediaUrls = field(default_factory=MediaUrls)
    started_at: float = field(default_factory=time.time)
    ready: bool = False


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key")


async def authenticate(gw: Gateway, request: Request) -> Tenant:
    key = _bearer(request)
    if key:
        tenant = await gw.keys.verify(key)
        if tenant is None:
            raise HTTPError(401, "AuthenticationFailed", "unknown or revoked API key")
        return tenant
    if gw.open_access:
        return Tenant(OPEN_TENANT, "local")
    raise HTTPError(401, "AuthenticationFailed", "send an API key: 'Authorization: Bearer bk_…'")


async def read_body(gw: Gateway, request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > gw.max_body_bytes:
        raise HTTPError(413, "PayloadTooLarge", f"body over the limit of {gw.max_body_bytes} bytes")
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > gw.max_body_bytes:
            raise HTTPError(413, "PayloadTooLarge", f"body over the limit of {gw.max_body_bytes} bytes")
        parts.append(chunk)
    return b"".join(parts)


async def parse_job_body(gw: Gateway, request: Request) -> dict[str, Any]:
    data = await read_body(gw, request)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        request._body = data  # the form parser reads the body we already capped
        try:
            form = await request.form(max_files=4, max_fields=8, max_part_size=gw.max_body_bytes)
        except Exception as exc:
            raise HTTPError(400, "InvalidRequest", f"unreadable multipart body: {exc}", field="body") from None
        raw = form.get("job")
        if not isinstance(raw, str):
            raise HTTPError(422, "InvalidRequest", "multipart needs a 'job' field holding the job JSON", field="job")
        body = _loads(raw.encode(), "job")
        inp = body.setdefault("input", {})
        if not isinstance(inp, dict):
            raise HTTPError(422, "InvalidRequest", "must be a JSON object", field="input")
        import base64

        for name in ("audio", "avatar"):
            upload = form.get(name)
            if upload is not None and not isinstance(upload, str):
                content = await upload.read()
                inp[name] = {"b64": base64.b64encode(content).decode(), "mime": upload.content_type or ""}
        return body
    return _loads(data, "body")


def _loads(data: bytes, where: str) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        raise HTTPError(400, "InvalidRequest", "is not valid JSON (or nests too deeply)", field=where) from None
    if not isinstance(body, dict):
        example = json.dumps(JOB_EXAMPLES["speech"]["value"])
        raise HTTPError(422, "InvalidRequest", f"must be a JSON object like {example}", field=where)
    return body


def check_options(body: dict[str, Any]) -> None:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise InvalidRequest("options", "must be an object")
    unknown = set(options) - {"deadline_s", "max_usd", "output_format"}
    if unknown:
        raise InvalidRequest("options", f"unknown option(s) {', '.join(sorted(map(str, unknown)))}")
    for name, minimum in (("deadline_s", 0.0), ("max_usd", 0.0)):
        value = options.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum or \
                value != value or value == float("inf") or (name == "deadline_s" and value == 0):
            raise InvalidRequest(f"options.{name}", "must be a positive number")
    fmt = options.get("output_format")
    formats = LONG_FORMATS if body.get("kind") == "long_speech" else AUDIO_FORMATS
    if fmt is not None and fmt not in formats:
        raise InvalidRequest("options.output_format", f"must be one of {', '.join(formats)}")
    hook = body.get("webhook_url")
    if hook is not None and (not isinstance(hook, str) or not hook.startswith(("http://", "https://"))
                             or len(hook) > 2048):
        raise InvalidRequest("webhook_url", "must be an http(s) URL")
    extra = set(body) - {"kind", "input", "options", "webhook_url"}
    if extra:
        raise InvalidRequest("body", f"unknown field(s) {', '.join(sorted(map(str, extra)))}")


def create_app(gw: Gateway) -> FastAPI:
    app = FastAPI(title="broker gateway", version="1", summary="Speech and talking-head jobs on the cheapest "
                  "healthy GPU provider, with failover, budgets and long work.")

    @app.exception_handler(HTTPError)
    async def _http_error(_: Request, exc: HTTPError) -> Response:
        return exc.response()

    @app.exception_handler(BrokerError)
    async def _broker_error(_: Request, exc: BrokerError) -> Response:
        status = 422 if isinstance(exc, InvalidRequest) else 502
        return JSONResponse({"error": exc.to_dict()}, status_code=status)

    @app.post("/v1/jobs", status_code=202, openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": JOB_SCHEMA, "examples": JOB_EXAMPLES}}}})
    async def create_job(request: Request) -> Response:
        tenant = await authenticate(gw, request)
        body = await parse_job_body(gw, request)
        if tenant.rate_per_minute is not None:  # before any media URL is fetched on its behalf
            recent = await gw.jobs.created_since(tenant.id, time.time() - 60.0)
            if recent >= tenant.rate_per_minute:
                raise HTTPError(429, "RateLimited", f"over {tenant.rate_per_minute} jobs a minute",
                                headers={"Retry-After": "60"})
        # Media URLs are fetched now, while the caller waits, and the bytes stored with the job (why:
        # broker.gateway.media); the idempotency hash is of the body as sent, URLs and all.
        req, stored = await gw.media.decode(body)
        check_options(body)
        if not isinstance(req, LongRequest):  # a book's limit is per piece, checked as it is split
            req.check_limits(gw.manager.settings.limits)
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        key = request.headers.get("idempotency-key")
        if key is not None and not 1 <= len(key) <= 255:
            raise HTTPError(422, "InvalidRequest", "must be 1..255 characters", field="Idempotency-Key")
        try:
            job, created = await gw.jobs.create(
                tenant=tenant.id, kind=body["kind"], request=stored,
                body_hash=hashlib.sha256(canonical.encode()).hexdigest(), idempotency_key=key,
                webhook_url=body.get("webhook_url"))
        except IdempotencyConflict:
            raise HTTPError(422, "InvalidRequest", "this key was used before with a different body",
                            field="Idempotency-Key") from None
        if created or job.state == "queued":  # a replay of a job whose first replica died before queueing it
            await gw.queue.enqueue(job.id)
        return JSONResponse({"id": job.id, "state": job.state}, status_code=202 if created else 200)

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str, request: Request, wait: float = 0.0) -> Response:
        """The job's state; ``wait=S`` holds the answer up to S seconds (≤ 60) until the job finishes."""
        tenant = await authenticate(gw, request)
        if not 0.0 <= wait <= 60.0:
            raise HTTPError(422, "InvalidRequest", "must be 0..60 seconds", field="wait")
        deadline = time.monotonic() + wait
        while True:
            job = await gw.jobs.get(job_id, tenant.id)
            if job is None:
                raise HTTPError(404, "NotFound", f"no job {job_id}")
            left = deadline - time.monotonic()
            if job.terminal or left <= 0:
                return JSONResponse(job.view())
            # woken at once when this replica finishes a job; another replica's jobs are seen by re-reading
            async with gw.runner.finished:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(gw.runner.finished.wait(), min(0.25, left))

    @app.get("/v1/jobs/{job_id}/output")
    async def get_output(job_id: str, request: Request) -> Response:
        tenant = await authenticate(gw, request)
        job = await gw.jobs.get(job_id, tenant.id)
        if job is None:
            raise HTTPError(404, "NotFound", f"no job {job_id}")
        if job.state in ("failed", "lost"):
            raise HTTPError(409, "JobFailed", (job.error or {}).get("message", "the job failed"))
        if job.state == "cancelled":
            raise HTTPError(410, "JobCancelled", "the job was cancelled and its output deleted")
        if job.state == "succeeded":
            if not job.output_key:  # DELETE on a finished job removes its output and keeps the record
                raise HTTPError(410, "Gone", "the output was deleted")
            return await _output_response(gw, job.output_key, job.output_mime or "application/octet-stream")
        return StreamingResponse(_follow(gw, job_id), media_type=_guess_mime(job.request))

    @app.get("/v1/jobs")
    async def list_jobs(request: Request, state: str | None = None, since: float | None = None,
                        until: float | None = None, cursor: str | None = None, limit: int = 50,
                        tenant: str | None = None) -> Response:
        who = await authenticate(gw, request)
        if state is not None and state not in STATES:
            raise HTTPError(422, "InvalidRequest", f"must be one of {', '.join(STATES)}", field="state")
        if not 1 <= limit <= 200:
            raise HTTPError(422, "InvalidRequest", "must be 1..200", field="limit")
        scope = who.id if not (gw.open_access and who.id == OPEN_TENANT) else tenant
        rows = await gw.jobs.list_jobs(tenant=scope, state=state, since=since, until=until, cursor=cursor, limit=limit)
        return JSONResponse({"jobs": [r.view() for r in rows],
                             "next_cursor": rows[-1].id if len(rows) == limit else None})

    @app.delete("/v1/jobs/{job_id}")
    async def delete_job(job_id: str, request: Request) -> Response:
        tenant = await authenticate(gw, request)
        job = await gw.jobs.cancel(job_id, tenant.id)
        if job is None:
            raise HTTPError(404, "NotFound", f"no job {job_id}")
        if job.output_key:
            await asyncio.to_thread(gw.outputs.delete, job.output_key)
            await gw.jobs.drop_output(job.id)
        job = await gw.jobs.get(job_id, tenant.id)
        assert job is not None
        return JSONResponse(job.view())

    @app.get("/v1/providers")
    async def providers(request: Request) -> Response:
        await authenticate(gw, request)
        report = await gw.manager.health()
        return JSONResponse({"ok": report.ok, "detail": report.detail, "providers": report.info})

    @app.get("/v1/costs")
    async def costs(request: Request, days: int = 30) -> Response:
        tenant = await authenticate(gw, request)
        if not 1 <= days <= 366:
            raise HTTPError(422, "InvalidRequest", "must be 1..366", field="days")
        since = time.time() - days * 86400.0
        rows = await gw.jobs.db.fetchall(
            "SELECT created_at, cost_usd, COALESCE(provider, '') AS provider FROM gateway_jobs"
            " WHERE created_at >= ? AND (? = 1 OR tenant = ?)",
            (since, 1 if gw.open_access and tenant.id == OPEN_TENANT else 0, tenant.id))
        by_day: dict[str, float] = {}
        by_provider: dict[str, float] = {}
        for r in rows:
            day = time.strftime("%Y-%m-%d", time.gmtime(r["created_at"]))
            by_day[day] = by_day.get(day, 0.0) + float(r["cost_usd"] or 0.0)
            by_provider[r["provider"] or "none"] = by_provider.get(r["provider"] or "none", 0.0) + \
                float(r["cost_usd"] or 0.0)
        return JSONResponse({"days": [{"day": d, "usd": round(v, 8)} for d, v in sorted(by_day.items())],
                             "providers": {p: round(v, 8) for p, v in sorted(by_provider.items())},
                             "total_usd": round(sum(by_day.values()), 8),
                             "budget": await asyncio.to_thread(_budget_left, gw.manager.ledger, tenant)})

    @app.post("/v1/quote", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": JOB_SCHEMA, "examples": JOB_EXAMPLES}}}})
    async def quote(request: Request) -> Response:
        await authenticate(gw, request)
        body = await parse_job_body(gw, request)
        req, _ = await gw.media.decode(body)  # a render's price depends on its audio's length
        check_options(body)
        options = body.get("options") or {}
        if isinstance(req, LongRequest):
            return JSONResponse(await asyncio.to_thread(_book_forecast, gw.manager, req))
        req.check_limits(gw.manager.settings.limits)
        plan = gw.manager.plan(req, deadline_s=options.get("deadline_s"), max_usd=options.get("max_usd"))
        return JSONResponse({
            "ranked": [c.quote.model_dump() | {"provider": c.name} for c in plan.ordered],
            "dropped": [{"provider": c.name, "reason": why} for c, why in plan.dropped]})

    @app.get("/healthz")
    async def healthz() -> Response:
        return JSONResponse({"ok": True, "uptime_s": round(time.time() - gw.started_at, 1)})

    @app.get("/readyz")
    async def readyz() -> Response:
        try:
            await gw.jobs.db.fetchone("SELECT 1 AS one")
        except Exception as exc:
            return JSONResponse({"ok": False, "detail": f"database: {type(exc).__name__}"}, status_code=503)
        if not gw.ready:
            return JSONResponse({"ok": False, "detail": "starting"}, status_code=503)
        return JSONResponse({"ok": True, "queue": gw.queue.description})

    @app.get("/metrics")
    async def metrics_route(request: Request) -> Response:
        if not gw.open_access:
            await authenticate(gw, request)
        text = metrics.render(await gw.jobs.counts(), gw.runner.latencies, running=gw.runner.running,
                              queue_depth=gw.queue.depth())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def dashboard() -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app


def _budget_left(ledger: Any, tenant: Tenant) -> dict[str, Any]:
    """The tenant's caps and what the ledger holds against them now (spent plus open reservations)."""
    out: dict[str, Any] = {}
    for name, cap, window in (("daily", tenant.daily_budget_usd, DAY_S), ("monthly", tenant.monthly_budget_usd,
                                                                          MONTH_S)):
        used = ledger.spent(window_s=window, tenant=tenant.id)
        out[name] = {"cap_usd": cap, "used_usd": round(used, 8),
                     "left_usd": None if cap is None else round(max(0.0, cap - used), 8)}
    return out


def _book_forecast(manager: Any, req: LongRequest) -> dict[str, Any]:
    """A book's expected wall time and $ over 1, 4, 16, 64 workers and the configured mix (nothing runs)."""
    from broker.cli.longform import fanout_rows
    from broker.longform import LongJob
    from broker.longform.journal import Journal

    journal = Journal(":memory:")  # quoting writes nothing
    try:
        job = LongJob(manager, req.chapters, journal=journal, **req.fields)
        job.close()
        return {"chapters": len(job.chapters), "pieces": len(job.pieces),
                "words": sum(p.words for p in job.pieces), "rows": fanout_rows(job)}
    finally:
        journal.close()


async def _output_response(gw: Gateway, key: str, mime: str) -> Response:
    # The first chunk is read before answering, so a missing output is a 410, not a broken 200. Store
    # calls block (a bucket is a network round trip): they run in a thread (StreamingResponse runs a
    # plain iterator in one too).
    it = gw.outputs.open_iter(key)
    try:
        first = await asyncio.to_thread(next, it, b"")
    except (FileNotFoundError, KeyError):
        raise HTTPError(410, "Gone", "the output was deleted") from None

    def chain() -> Any:
        yield first
        yield from it

    return StreamingResponse(chain(), media_type=mime)


def _guess_mime(body: dict[str, Any]) -> str:
    if body.get("kind") == "render":
        return "video/mp4"
    return LONG_FORMATS.get(str((body.get("options") or {}).get("output_format") or "wav"), "audio/wav")


async def _follow(gw: Gateway, job_id: str, poll_s: float = 0.2) -> Any:
    """Bytes of a running job's output as they are written, then the rest once it finishes."""
    sent = 0
    while True:
        job = await gw.jobs.get(job_id)
        if job is None or job.state in ("failed", "lost", "cancelled"):
            return
        if job.state == "succeeded" and job.output_key:
            skip = sent  # the partial file already gave these (outputs are written front to back)
            async for chunk in iterate_in_threadpool(gw.outputs.open_iter(job.output_key)):
                if skip >= len(chunk):
                    skip -= len(chunk)
                    continue
                yield chunk[skip:]
                skip = 0
            return
        ext = _ext(job.request)
        # MP4-family files (m4a, m4b) put their index at the end: there is nothing playable to send early
        partial = None if ext in ("m4a", "m4b", "mp4") else gw.outputs.partial_path(f"{job_id}.{ext}")
        if partial is not None and partial.exists():
            with open(partial, "rb") as fh:
                fh.seek(sent)
                data = fh.read()
            if data:
                sent += len(data)
                yield data
        await asyncio.sleep(poll_s)


def _ext(body: dict[str, Any]) -> str:
    if body.get("kind") == "render":
        return "mp4"
    return str((body.get("options") or {}).get("output_format") or "wav")
