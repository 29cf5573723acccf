"""The self-hosted worker: the HTTP job API over ``broker.worker.handle`` / ``handle_stream``.

Routes (the same on `broker worker serve` and on the Modal app's ASGI endpoint)::

    GET  /health   the process answers (no key needed: liveness probes)
    GET  /ready    200 once the engines are loaded, else 503 (no key needed: readiness probes)
    GET  /metrics  Prometheus text: queue depth, slots, job seconds, engine load time (key needed)
    POST /run      one wire job (JSON) -> its result payload
    POST /stream   one speech job -> newline-delimited JSON chunk payloads, as made, then an empty "final": true

Errors are wire error payloads (``{"ok": false, "error": {...}}``) with a matching status:
400 unreadable JSON, 401 missing/wrong key, 413 body over the limit, 422 invalid request,
503 not ready / busy (with Retry-After), 500 a job that failed inside the engine.

``GET /openapi.json`` (behind the same key) describes the job bodies, with examples. A request's
body is read only once it holds a job slot, so waiting jobs cost no memory.

Jobs run one at a time by default (``concurrency``): a GPU shared by two renders only makes both
slow. A job whose client hangs up is cancelled (the engines stop at their next check).
"""

from __future__ import annotations

import asyncio
import hmac
import importlib
import json
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import SecretStr

from broker import engines, wire
from broker.errors import (
    AuthenticationFailed,
    BrokerError,
    ConfigurationError,
    EngineUnavailable,
    InvalidRequest,
    JobFailed,
    ProviderUnavailable,
)
from broker.types import DEFAULT_LIMITS, Limits, RenderRequest, build
from broker.worker import handle, handle_stream
from broker.worker.fetch import FetchPolicy
from broker.worker.metrics import CONTENT_TYPE, WorkerMetrics, outcome_of, task_of
from broker.worker.openapi import openapi_document

log = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1024 * 1024
DEFAULT_MAX_BODY_BYTES = 64 * MiB
#: a body this many times over the limit is not read to the end before the 413 goes back
_DRAIN_FACTOR = 8
AVATAR_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
#: what a busy worker asks clients to wait before trying again
BUSY_RETRY_AFTER_S = 2

_STATUS_BY_ERROR = {
    "InvalidRequest": 422,
    "AuthenticationFailed": 401,
    "EngineUnavailable": 503,
    "ProviderUnavailable": 503,
    "RateLimited": 429,
    "ProviderTimeout": 504,
}


@dataclass
class WorkerOptions:
    #: clients must send it as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``; None = no auth
    api_key: SecretStr | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    #: a folder of portrait images served as ``avatar_preset`` = file name without suffix
    avatars_dir: Path | None = None
    #: jobs that run at once; more wait for a slot
    concurrency: int = 1
    #: jobs allowed to wait for a slot before new ones are turned away (503 + Retry-After)
    max_waiting: int = 32
    #: speech engines to load before /ready turns 200; None = already loaded by the host (Modal)
    preload: tuple[str, ...] | None = ("piper",)
    #: load the render engine before /ready too; False = on the first render job (speech-only fleets start faster)
    preload_render: bool = True
    limits: Limits = DEFAULT_LIMITS
    #: which media URLs jobs may make this worker fetch; None = the ``worker.*`` settings
    fetch_policy: FetchPolicy | None = None


@dataclass
class Presets:
    """Avatars read from the preset directory at start."""

    images: dict[str, bytes] = field(default_factory=dict)
    #: True when the render engine took them (``broker.engines.avatars.register_preset``) and
    #: pre-processed them; False when this server substitutes the image bytes into each job
    registered: bool = False


def load_presets(directory: Path) -> Presets:
    """Read and check every image in ``directory``; hand each to the render engine when it can take them."""
    if not directory.is_dir():
        raise ConfigurationError(f"avatar directory {directory} does not exist")
    register = _preset_registrar()
    presets = Presets(registered=register is not None)
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() not in AVATAR_SUFFIXES or not path.is_file():
            continue
        data = path.read_bytes()
        try:
            build(RenderRequest, text="check", avatar=data)
        except InvalidRequest as exc:
            raise ConfigurationError(f"avatar preset {path.name}: {exc.reason}") from None
        if register is not None:
            try:
                register(path.stem, data)
            except BrokerError as exc:
                raise ConfigurationError(f"avatar preset {path.name}: {exc.message}") from None
        presets.images[path.stem] = data
    return presets


def _preset_registrar() -> Callable[[str, bytes], Any] | None:
    try:
        module = importlib.import_module("broker.engines.avatars")
    except ModuleNotFoundError as exc:
        if exc.name != "broker.engines.avatars":
            log.warning("avatar pre-processing unavailable (%s); presets are passed as images", exc)
        return None
    fn = getattr(module, "register_preset", None)
    return fn if callable(fn) else None


class _ClientGone(Exception):
    """The client hung up before its job finished."""


class WorkerState:
    """Readiness, presets and job slots of one server process."""

    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        self.presets = Presets()
        self.ready = asyncio.Event()
        self.error: str | None = None
        self.running = 0
        self.waiting = 0
        self.served = 0
        #: jobs stopped because their client hung up
        self.cancelled = 0
        self._slots = asyncio.Semaphore(max(1, options.concurrency))
        self.metrics = WorkerMetrics()
        self._warm_task: asyncio.Task[None] | None = None

    # -- start-up ------------------------------------------------------------------
    def start_warm_up(self) -> None:
        if self._warm_task is None:
            self._warm_task = asyncio.get_running_loop().create_task(self._warm_up())

    async def _warm_up(self) -> None:
        started = time.perf_counter()
        try:
            if self.options.preload is not None:
                await asyncio.to_thread(engines.preload, self.options.preload,
                                        render_engine=self.options.preload_render)
            if self.options.avatars_dir is not None:
                self.presets = await asyncio.to_thread(load_presets, self.options.avatars_dir)
                log.info("loaded %d avatar presets (%s)", len(self.presets.images),
                         "pre-processed by the render engine" if self.presets.registered else "as images")
            self.metrics.engine_load_seconds = time.perf_counter() - started
        except BrokerError as exc:
            self.error = exc.message
            log.error("worker not ready: %s", exc.message)
        except Exception as exc:  # a broken install must show on /ready, not kill the server
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("worker not ready")
        finally:
            self.ready.set()

    async def wait_ready(self) -> None:
        self.start_warm_up()
        await self.ready.wait()
        if self.error is not None:
            raise EngineUnavailable(f"worker is not ready: {self.error}")

    def readiness(self) -> tuple[int, dict[str, Any]]:
        info: dict[str, Any] = {
            "ready": self.ready.is_set() and self.error is None,
            "device": engines.device(),
            #: the speech engines this worker really has (built-ins that can run here, plugins)
            "engines": engines.available(),
            "running": self.running,
            "waiting": self.waiting,
            "served": self.served,
            "cancelled": self.cancelled,
            "presets": sorted(self.presets.images),
        }
        if self.error is not None:
            info["error"] = self.error
        return (200 if info["ready"] else 503), info

    # -- presets -------------------------------------------------------------------
    def apply_preset(self, payload: Any) -> Any:
        """Resolve ``avatar_preset`` against this worker's presets before the job runs."""
        if not isinstance(payload, dict) or payload.get("task") != "render":
            return payload
        inp = payload.get("input")
        if not isinstance(inp, dict) or not inp.get("avatar_preset") or inp.get("avatar") is not None:
            return payload
        name = str(inp["avatar_preset"])
        image = self.presets.images.get(name)
        if image is None:
            known = ", ".join(sorted(self.presets.images)) or "none"
            raise InvalidRequest("input.avatar_preset", f"unknown preset {name!r}; this worker has: {known}")
        if self.presets.registered:
            return payload  # the render engine holds the pre-processed avatar under this name
        return {**payload, "input": {**inp, "avatar": wire.encode_media(image, "image/*"), "avatar_preset": None}}

    # -- job slots -----------------------------------------------------------------
    async def _acquire(self) -> None:
        if self._slots.locked() and self.waiting >= self.options.max_waiting:
            raise ProviderUnavailable(
                f"worker busy: {self.running} running, {self.waiting} waiting", retry_after=BUSY_RETRY_AFTER_S
            )
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1

    def _release(self, served: bool = True) -> None:
        self.running -= 1
        self.served += int(served)
        self._slots.release()

    def _in_thread(self, work: Callable[[], T], task: str = "other") -> asyncio.Future[T]:
        """Run ``work`` on its own thread; the job slot is freed when the thread ends, not when we stop waiting."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(result: Any = None, error: BaseException | None = None) -> None:
            if future.done():  # cancelled: the client left
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        def target() -> None:
            started, result, error = time.perf_counter(), None, None
            try:
                result = work()
                _post(loop, settle, result)
            except BaseException as exc:
                error = exc
                _post(loop, settle, None, exc)
            finally:
                _post(loop, self.metrics.observe_job, task, outcome_of(result, error), time.perf_counter() - started)
                _post(loop, self._release)

        threading.Thread(target=target, name="broker-job", daemon=True).start()
        return future

    async def with_slot(self, read: Callable[[], Awaitable[T]]) -> T:
        """Wait for a job slot, then ``read`` the request: a waiting job holds no body in memory.

        The slot stays taken for the job that follows (``run_job``/``stream_job`` with ``slot_held``)."""
        await self._acquire()
        try:
            return await read()
        except BaseException:
            self._release(served=False)
            raise

    async def run_job(self, payload: Any, *, slot_held: bool = False) -> dict[str, Any]:
        if not slot_held:
            await self._acquire()
        return await self.start_job(payload)

    def start_job(self, payload: Any) -> Awaitable[dict[str, Any]]:
        """Start the job on its thread now (its slot already held); await the result to get it.

        Starting synchronously means no cancellation can fall between taking the slot and the
        thread that gives it back."""
        cancel = threading.Event()
        loop = asyncio.get_running_loop()

        def work() -> dict[str, Any]:
            result = handle(payload, cancel=cancel, limits=self.options.limits,
                            fetch_policy=self.options.fetch_policy)
            if cancel.is_set():
                _post(loop, self._count_cancelled)
            return result

        future = self._in_thread(work, task_of(payload))

        async def result() -> dict[str, Any]:
            try:
                return await future
            except BaseException:
                cancel.set()
                raise

        return result()

    def _count_cancelled(self) -> None:
        self.cancelled += 1

    async def stream_job(self, payload: Any, *, slot_held: bool = False) -> AsyncGenerator[dict[str, Any], None]:
        """Take a slot, then yield chunk payloads as the engine makes them."""
        if not slot_held:
            await self._acquire()
        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        def produce() -> dict[str, Any] | None:
            last = None
            try:
                for item in handle_stream(payload, cancel=cancel, limits=self.options.limits,
                                          fetch_policy=self.options.fetch_policy):
                    last = item
                    _post(loop, queue.put_nowait, item)
                    if cancel.is_set():
                        break
                if cancel.is_set():
                    _post(loop, self._count_cancelled)
            finally:
                _post(loop, queue.put_nowait, None)
            return last  # its "ok" is the stream's outcome in /metrics

        done = self._in_thread(produce, task_of(payload))
        done.add_done_callback(lambda f: f.cancelled() or f.exception())  # errors end the stream, not here
        return _drain(queue, cancel)


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """Call ``fn`` on the server's loop from a job thread (the loop may already be gone at shutdown)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


async def _drain(queue: asyncio.Queue[dict[str, Any] | None], cancel: threading.Event
                 ) -> AsyncGenerator[dict[str, Any], None]:
    try:
        while (item := await queue.get()) is not None:
            yield item
    finally:
        cancel.set()  # the client left or the stream ended: either way the engine may stop


# -- request plumbing ------------------------------------------------------------------------------
def _check_key(request: Request, expected: SecretStr | None) -> None:
    if expected is None:
        return
    given = request.headers.get("x-api-key")
    if given is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else None
    if given is None or not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
        # Never say which part was wrong, and never echo what was sent.
        raise AuthenticationFailed("missing or wrong API key", status_code=401)


class _WithStatus(Exception):
    """A typed error that needs a status of its own (400 for a body that is not JSON at all)."""

    def __init__(self, error: BrokerError, status: int) -> None:
        super().__init__(error.message)
        self.error = error
        self.status = status


class _TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


async def _read_body(request: Request, limit: int) -> bytearray:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit * _DRAIN_FACTOR:
        raise _TooLarge(limit)
    body = bytearray()
    over = False
    async for part in request.stream():
        if over:
            # Keep reading (and dropping) so the client gets our 413 instead of a broken pipe.
            if len(body) + len(part) > limit * _DRAIN_FACTOR:
                break
            continue
        body += part
        if len(body) > limit:
            over = True
    if over or (declared.isdigit() and int(declared) > limit):
        raise _TooLarge(limit)
    return body  # no copy: json.loads reads a bytearray as it is


#: deepest nesting a job needs is 4 (input.context[i].audio); anything far deeper is an attack
MAX_JSON_DEPTH = 32


def _parse_json(body: bytes | bytearray) -> Any:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _WithStatus(InvalidRequest("payload", "is not valid JSON"), 400) from None
    except RecursionError:
        raise _WithStatus(InvalidRequest("payload", f"is nested deeper than {MAX_JSON_DEPTH} levels"), 400) from None
    if _depth_over(data, MAX_JSON_DEPTH):
        raise _WithStatus(InvalidRequest("payload", f"is nested deeper than {MAX_JSON_DEPTH} levels"), 400)
    return data


def _depth_over(data: Any, limit: int) -> bool:
    """Is ``data`` nested deeper than ``limit``? Iterative, so no depth can blow the stack."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client hangs up first; then it is cancelled."""

    async def hung_up() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    job = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(hung_up())
    try:
        await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not job.done():
            job.cancel()
        watch.cancel()
    if job.done() and not job.cancelled():
        return job.result()
    raise _ClientGone()


def status_for(payload: dict[str, Any]) -> int:
    if payload.get("ok") is not False:
        return 200
    err = payload.get("error") or {}
    return _STATUS_BY_ERROR.get(str(err.get("type")), 500)


def _error_response(exc: BrokerError, status: int | None = None) -> JSONResponse:
    payload = wire.encode_error(None, exc)
    headers: dict[str, str] = {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(int(retry_after))
    if isinstance(exc, AuthenticationFailed):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(payload, status_code=status or status_for(payload), headers=headers)


def create_app(
    options: WorkerOptions | None = None,
    *,
    api_key: str | SecretStr | None = None,
    **overrides: Any,
) -> FastAPI:
    """The worker's ASGI app. ``api_key`` and keyword overrides are shortcuts for ``WorkerOptions`` fields."""
    opts = options or WorkerOptions()
    if api_key is not None:
        opts.api_key = api_key if isinstance(api_key, SecretStr) else SecretStr(api_key)
    for name, value in overrides.items():
        if not hasattr(opts, name):
            raise TypeError(f"unknown worker option {name!r}")
        setattr(opts, name, value)
    state = WorkerState(opts)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.start_warm_up()  # in the background: /health answers while engines load
        yield

    app = FastAPI(title="broker worker", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = state
    document = openapi_document(opts.limits)

    @app.exception_handler(BrokerError)
    async def _broker_error(_: Request, exc: BrokerError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(_WithStatus)
    async def _with_status(_: Request, exc: _WithStatus) -> JSONResponse:
        return _error_response(exc.error, exc.status)

    @app.exception_handler(_TooLarge)
    async def _too_large(_: Request, exc: _TooLarge) -> JSONResponse:
        limit_mb = exc.limit / MiB
        return _error_response(
            InvalidRequest("payload", f"request body is over this worker's limit of {limit_mb:g} MiB"), 413
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"ok": True}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        state.start_warm_up()
        status, info = state.readiness()
        return JSONResponse(info, status_code=status)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        _check_key(request, opts.api_key)  # queue depth and traffic are the operator's business only
        text = state.metrics.render(state, slots=max(1, opts.concurrency), max_waiting=opts.max_waiting)
        return Response(text, media_type=CONTENT_TYPE)

    @app.get("/openapi.json")
    async def openapi(request: Request) -> JSONResponse:
        _check_key(request, opts.api_key)
        return JSONResponse(document)

    async def job_payload(request: Request) -> Any:
        """Authenticate, wait until ready and for a job slot, and only then read the body."""
        _check_key(request, opts.api_key)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > opts.max_body_bytes:
            raise _TooLarge(opts.max_body_bytes)  # refused before it waits for a slot
        await state.wait_ready()  # presets load with the engines: resolve them after

        async def read() -> Any:
            payload = _parse_json(await _read_body(request, opts.max_body_bytes))
            return state.apply_preset(payload)

        return await state.with_slot(read)

    @app.post("/run")
    async def run(request: Request) -> Response:
        payload = await job_payload(request)
        try:
            result = await _until_disconnect(request, state.start_job(payload))
        except _ClientGone:
            return Response(status_code=499)  # nobody reads this; the job was cancelled
        return JSONResponse(result, status_code=status_for(result))

    @app.post("/stream")
    async def stream(request: Request) -> Response:
        payload = await job_payload(request)
        chunks = await state.stream_job(payload, slot_held=True)
        try:
            first = await _until_disconnect(request, anext(chunks))
        except _ClientGone:
            await chunks.aclose()
            return Response(status_code=499)
        except StopAsyncIteration:
            first = wire.encode_error(None, JobFailed("the engine produced no audio"))
        if first.get("ok") is False:
            # Nothing streamed yet, so the error can still carry its own status (422 for bad input).
            await chunks.aclose()
            return JSONResponse(first, status_code=status_for(first))

        async def lines() -> AsyncIterator[bytes]:
            try:
                yield json.dumps(first).encode() + b"\n"
                async for chunk in chunks:
                    yield json.dumps(chunk).encode() + b"\n"
            finally:
                await chunks.aclose()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return app
