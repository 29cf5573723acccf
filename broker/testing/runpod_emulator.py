"""A loopback RunPod: the hosted job API, the worker-facing queue, and the REST management API,
with the REAL ``runpod`` SDK worker running ``handlers/runpod/handler.py`` against it.

One aiohttp server (in a background thread) answers

- the hosted API the adapter and ``runpod.Endpoint`` use: ``/v2/{endpoint}/run|runsync|status/{id}|
  stream/{id}|cancel/{id}|retry/{id}|health|purge-queue`` (Bearer auth; a wrong key gets 401);
- the worker queue the SDK polls (runpod 1.12.0, ``serverless/modules/rp_job.py``, ``rp_http.py``,
  ``rp_ping.py``): ``GET job-take/{worker}?job_in_progress=0|1`` (``job-take-batch`` with
  ``batch_size``) long-polled, answered 204 when idle; ``POST job-done/{worker}/{job}?isStream=`` and
  ``job-stream/...`` with a JSON body sent as form data; ``GET job-stop/{worker}`` long-polled for
  ``{"jobsToStop": [...]}`` (how a cancel reaches the worker); ``GET ping/{worker}``. The worker
  authenticates with its own key, raw in ``Authorization``;
- the REST API ``/v1/templates|endpoints`` (``broker.testing.runpod_rest``);
- ``/_emulator/faults|state|crash|files/{name}`` to steer it from outside the process.

The worker is started as a subprocess in the SDK's deployed mode (``RUNPOD_WEBHOOK_GET_JOB`` set),
with the SDK's start-up fitness checks skipped (they dial 8.8.8.8 and need a GPU).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import signal
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from broker.testing.runpod_jobs import IN_PROGRESS, EmulatedJob, Faults, JobBook
from broker.testing.runpod_rest import RestStore
from broker.testing.runpod_workers import (
    WorkerInfo,
    WorkerScaler,
    default_handler_path,
    kill_group,
    spawn_worker,
    stop_process,
    worker_environment,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

#: hosted API payload limits (docs.runpod.io/serverless/endpoints/operation-reference, 2026-11-23)
RUN_LIMIT = 10_000_000
RUNSYNC_LIMIT = 20_000_000


class RunPodEmulator:
    """Start with ``with RunPodEmulator() as emu:``; point broker at it with ``emu.env()``."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        endpoint_id: str | None = None,
        api_key: str | None = None,
        worker: bool = True,
        mode: str = "stream",
        handler_path: Path | str | None = None,
        faults: Faults | None = None,
        seed: int = 0,
        worker_env: dict[str, str] | None = None,
        worker_log: Path | str | None = None,
        long_poll_s: float = 10.0,
        ping_interval_ms: int = 1000,
        workers_max: int = 1,
        scale_from_zero: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.endpoint_id = endpoint_id or "emu" + secrets.token_hex(5)
        self.api_key = api_key or "rpa_emulated_" + secrets.token_hex(12)
        self.worker_key = "worker_" + secrets.token_hex(12)
        self.run_worker = worker
        self.mode = mode
        self.handler_path = Path(handler_path) if handler_path else default_handler_path()
        self.faults = faults or Faults()
        self.book = JobBook(self.faults, seed)
        self.rest = RestStore(self._user_authorized)
        self.worker_env = dict(worker_env or {})
        self.long_poll_s = long_poll_s
        self.ping_interval_ms = ping_interval_ms
        self.workers: dict[str, WorkerInfo] = {}
        self.files: dict[str, tuple[bytes, str]] = {}
        #: (worker id, seconds from spawn to its first job-take) for every managed worker that came up
        self.cold_starts: list[tuple[str, float]] = []
        self._tmp = tempfile.TemporaryDirectory(prefix="runpod-emulator-")
        self.worker_log = Path(worker_log) if worker_log else Path(self._tmp.name) / "worker.log"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._stopping = False
        self._reaper: asyncio.Task[None] | None = None
        self._worker_count = 0
        #: like an endpoint's workersMax: up to this many SDK workers; from zero, one starts (cold) per waiting job
        self.scaler = WorkerScaler(max(1, workers_max), scale_from_zero)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> RunPodEmulator:
        if self.run_worker and not self.handler_path.is_file():
            raise FileNotFoundError(
                f"RunPod handler not found at {self.handler_path}; pass handler_path (--handler) to the "
                "checkout's handlers/runpod/handler.py")
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._start_server())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=serve, name="runpod-emulator", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        if self.run_worker:
            for _ in range(self.scaler.initial()):
                self._call(self._spawn_worker())
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        try:
            self._call(self._shutdown(), timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop = None
            self._tmp.cleanup()

    def __enter__(self) -> RunPodEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = 60) -> T:
        assert self._loop is not None, "the emulator is not running"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- what callers read -----------------------------------------------------------
    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v2"

    @property
    def rest_url(self) -> str:
        return f"{self.root_url}/v1"

    def env(self) -> dict[str, str]:
        """Variables that point broker (and the runpod SDK client) at this emulator."""
        return {
            "BROKER_RUNPOD__BASE_URL": self.base_url,
            "BROKER_RUNPOD__REST_URL": self.rest_url,
            "BROKER_RUNPOD__ENDPOINT_ID": self.endpoint_id,
            "RUNPOD_API_KEY": self.api_key,
            "RUNPOD_ENDPOINT_BASE_URL": self.base_url,
        }

    def worker_environment(self, worker_id: str) -> dict[str, str]:
        """What RunPod sets in a worker container (plus the fitness-check skips)."""
        return worker_environment(f"{self.base_url}/{self.endpoint_id}", self.endpoint_id, worker_id,
                                  self.worker_key, self.mode, self.ping_interval_ms)

    def job(self, job_id: str) -> dict[str, Any] | None:
        """A job's /status answer (None once unknown)."""
        return self._call(self._job_status(job_id))

    def state(self) -> dict[str, Any]:
        return self._call(self._state())

    def set_faults(self, **changes: Any) -> None:
        self._call(self._set_faults(changes))

    def wait_for_worker(self, timeout: float = 120.0) -> float:
        """Block until a worker takes part in the queue; returns its cold start in seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            workers = list(self.workers.values())
            ready = [w for w in workers if w.alive and w.first_poll is not None]
            if ready:
                w = ready[-1]
                return (w.first_poll or w.spawned) - w.spawned
            dead = [w for w in workers if w.proc is not None and not w.alive and not w.stopping]
            if dead and not self.faults.restart_workers:
                code = dead[-1].exit_code
                raise RuntimeError(f"the RunPod worker exited with code {code}:\n{self.worker_log_tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"no RunPod worker came up in {timeout:g} s:\n{self.worker_log_tail()}")

    def crash_worker(self) -> None:
        """Kill the worker process now (and its heartbeat child), as an OOM or a node failure would."""
        self._call(self._crash_all())

    def restart_worker(self) -> None:
        self._call(self._spawn_worker())

    def worker_log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.worker_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no worker log)"

    # -- server ------------------------------------------------------------------------
    async def _start_server(self) -> None:
        app = web.Application(client_max_size=RUNSYNC_LIMIT + 5_000_000)
        v2 = "/v2/{endpoint}"
        app.add_routes([
            web.post(f"{v2}/run", self._hosted(self._run)),
            web.post(f"{v2}/runsync", self._hosted(self._runsync)),
            web.get(f"{v2}/status/{{job}}", self._hosted(self._status)),
            web.post(f"{v2}/status/{{job}}", self._hosted(self._status)),
            web.get(f"{v2}/stream/{{job}}", self._hosted(self._stream)),
            web.post(f"{v2}/cancel/{{job}}", self._hosted(self._cancel)),
            web.post(f"{v2}/retry/{{job}}", self._hosted(self._retry)),
            web.get(f"{v2}/health", self._hosted(self._health)),
            web.post(f"{v2}/purge-queue", self._hosted(self._purge)),
            web.get(f"{v2}/job-take/{{worker}}", self._worker_route(self._job_take)),
            web.get(f"{v2}/job-take-batch/{{worker}}", self._worker_route(self._job_take)),
            web.post(f"{v2}/job-done/{{worker}}/{{job}}", self._worker_route(self._job_done)),
            web.post(f"{v2}/job-stream/{{worker}}/{{job}}", self._worker_route(self._job_stream)),
            web.get(f"{v2}/job-stop/{{worker}}", self._worker_route(self._job_stop)),
            web.get(f"{v2}/ping/{{worker}}", self._worker_route(self._ping)),
            web.post("/_emulator/faults", self._admin(self._admin_faults)),
            web.get("/_emulator/state", self._admin(self._admin_state)),
            web.post("/_emulator/crash", self._admin(self._admin_crash)),
            web.put("/_emulator/files/{name}", self._admin(self._put_file)),
            web.get("/_emulator/files/{name}", self._get_file),
            *self.rest.routes("/v1"),
        ])
        # A loopback emulator needs no long graceful shutdown: in-flight long-polls are released above.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = int(self._runner.addresses[0][1])
        self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _shutdown(self) -> None:
        self._stopping = True
        await self.book.notify()  # release every long-poll
        for w in self.workers.values():
            w.stopping = True
        await asyncio.gather(*(asyncio.to_thread(stop_process, w.proc) for w in self.workers.values() if w.proc))
        if self._reaper is not None:
            self._reaper.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _reap(self) -> None:
        """Timeouts, expiry, dead workers; also wakes long-polls waiting on a cold start."""
        while not self._stopping:
            self.book.expire()
            for w in list(self.workers.values()):
                if w.proc is None or w.exit_code is not None:
                    continue
                code = w.proc.poll()
                if code is None:
                    continue
                w.exit_code = code
                if w.stopping:
                    continue
                self.book.worker_died(w.id, code)
                log.warning("RunPod worker %s exited with code %s", w.id, code)
                if self.faults.restart_workers and not self._stopping:
                    await self._spawn_worker()
            if self.run_worker and not self._stopping:
                for _ in range(self.scaler.to_start(self.workers.values(), len(self.book.queue))):
                    await self._spawn_worker()
            await self.book.notify()
            await asyncio.sleep(0.1)

    # -- workers ---------------------------------------------------------------------
    async def _spawn_worker(self) -> WorkerInfo:
        self._worker_count += 1
        worker_id = f"emu-worker-{self._worker_count}"
        env = {**self.worker_env, **self.worker_environment(worker_id)}
        proc = spawn_worker(self.handler_path, env, self.worker_log, Path(self._tmp.name) / "home")
        now = time.monotonic()
        info = WorkerInfo(worker_id, proc, spawned=now, ready_at=now + self.faults.cold_start_s)
        self.workers[worker_id] = info
        return info

    def _worker(self, worker_id: str) -> WorkerInfo:
        info = self.workers.get(worker_id)
        if info is None:  # a worker we did not start (--no-worker): someone runs the image by hand
            now = time.monotonic()
            ready = now + self.faults.cold_start_s
            info = self.workers[worker_id] = WorkerInfo(worker_id, None, spawned=now, ready_at=ready)
        info.last_seen = time.monotonic()
        return info

    async def _crash_all(self) -> None:
        for w in self.workers.values():
            if w.proc is not None and w.alive:
                await asyncio.to_thread(kill_group, w.proc, signal.SIGKILL)

    async def _crash_later(self, worker_id: str, delay: float) -> None:
        await asyncio.sleep(delay)
        w = self.workers.get(worker_id)
        if w is not None and w.proc is not None and w.alive:
            log.info("crash fault: killing worker %s mid-job", worker_id)
            await asyncio.to_thread(kill_group, w.proc, signal.SIGKILL)

    # -- auth and faults ---------------------------------------------------------------
    def _user_authorized(self, request: web.Request) -> bool:
        given = request.headers.get("Authorization", "").strip()
        given = given[7:].strip() if given.lower().startswith("bearer ") else given
        return secrets.compare_digest(given.encode(), self.api_key.encode())

    def _hosted(self, fn: Callable[[web.Request], Awaitable[web.StreamResponse]]
                ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def route(request: web.Request) -> web.StreamResponse:
            if self.faults.reject_auth or not self._user_authorized(request):
                return web.json_response({"error": "Unauthorized"}, status=401)
            if self.faults.rate_limit_burst > 0:
                self.faults.rate_limit_burst -= 1
                return web.json_response({"error": "Too Many Requests"}, status=429,
                                         headers={"Retry-After": f"{self.faults.retry_after_s:g}"})
            endpoint = request.match_info["endpoint"]
            if endpoint != self.endpoint_id and endpoint not in self.rest.endpoints:
                return web.json_response({"error": f"endpoint {endpoint} not found"}, status=404)
            return await fn(request)

        return route

    def _worker_route(self, fn: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def route(request: web.Request) -> web.StreamResponse:
            given = request.headers.get("Authorization", "")
            if not secrets.compare_digest(given.encode(), self.worker_key.encode()):
                return web.json_response({"error": "Unauthorized"}, status=401)
            return await fn(request)

        return route

    def _admin(self, fn: Callable[[web.Request], Awaitable[web.StreamResponse]]
               ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def route(request: web.Request) -> web.StreamResponse:
            if not self._user_authorized(request):
                return web.json_response({"error": "Unauthorized"}, status=401)
            return await fn(request)

        return route

    # -- hosted API ------------------------------------------------------------------
    async def _submit(self, request: web.Request, limit: int, sync: bool) -> EmulatedJob | web.Response:
        raw = await request.read()
        if len(raw) > limit:
            return web.json_response({"error": f"payload is {len(raw)} bytes; the limit is {limit}"}, status=413)
        try:
            body = json.loads(raw)
        except ValueError:
            return web.json_response({"error": "body is not JSON"}, status=400)
        if not isinstance(body, dict) or "input" not in body:
            return web.json_response({"error": "the request needs an 'input'"}, status=400)
        policy = body.get("policy") or {}
        if not isinstance(policy, dict):
            return web.json_response({"error": "policy must be an object"}, status=400)
        execution, ttl = policy.get("executionTimeout"), policy.get("ttl")
        if execution is not None and (not isinstance(execution, int) or execution <= 5000):
            return web.json_response({"error": "policy.executionTimeout must be > 5000 ms"}, status=400)
        if ttl is not None and (not isinstance(ttl, int) or not 10_000 <= ttl <= 7 * 24 * 3600 * 1000):
            return web.json_response({"error": "policy.ttl must be between 10000 ms and one week"}, status=400)
        job = self.book.create(body["input"], policy, sync=sync)
        await self.book.notify()
        return job

    async def _run(self, request: web.Request) -> web.StreamResponse:
        job = await self._submit(request, RUN_LIMIT, sync=False)
        if isinstance(job, web.Response):
            return job
        return web.json_response({"id": job.id, "status": job.status})

    async def _runsync(self, request: web.Request) -> web.StreamResponse:
        job = await self._submit(request, RUNSYNC_LIMIT, sync=True)
        if isinstance(job, web.Response):
            return job
        try:
            wait_s = min(300.0, max(1.0, float(request.query.get("wait", 90_000)) / 1000))
        except ValueError:
            wait_s = 90.0
        deadline = time.monotonic() + wait_s
        async with self.book.changed:
            while job.status in ("IN_QUEUE", IN_PROGRESS) and not self._stopping:
                if not await self.book.wait_changed(deadline):
                    break
        return web.json_response(job.status_dict())

    def _lookup(self, request: web.Request) -> EmulatedJob | None:
        return self.book.jobs.get(request.match_info["job"])

    async def _status(self, request: web.Request) -> web.StreamResponse:
        job = self._lookup(request)
        if job is None:
            return web.json_response({"error": "request does not exist"}, status=404)
        if "ttl" in request.query:  # ?ttl=ms: keep this job's result that long
            try:
                job.retention_s = float(request.query["ttl"]) / 1000
            except ValueError:
                return web.json_response({"error": "ttl must be a number of ms"}, status=400)
        return web.json_response(job.status_dict())

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        job = self._lookup(request)
        if job is None:
            return web.json_response({"error": "request does not exist"}, status=404)
        out: dict[str, Any] = {"id": job.id, "status": job.status, "stream": self.book.new_stream_items(job)}
        if job.status == "FAILED":
            out["error"] = job.error
        return web.json_response(out)

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        if self.faults.cancel_refusals > 0:
            self.faults.cancel_refusals -= 1
            code = self.faults.cancel_refusal_status
            headers = {"Retry-After": f"{self.faults.retry_after_s:g}"} if code == 429 else None
            return web.json_response({"error": "cancel refused (cancel_refusals fault)"}, status=code,
                                     headers=headers)
        job = self._lookup(request)
        if job is None:
            return web.json_response({"error": "request does not exist"}, status=404)
        self.book.cancel(job)
        await self.book.notify()
        return web.json_response({"id": job.id, "status": job.status})

    async def _retry(self, request: web.Request) -> web.StreamResponse:
        job = self._lookup(request)
        if job is None:
            return web.json_response({"error": "request does not exist"}, status=404)
        if not self.book.retry(job):
            return web.json_response({"error": f"only FAILED or TIMED_OUT jobs can be retried, not {job.status}"},
                                     status=400)
        await self.book.notify()
        return web.json_response({"id": job.id, "status": job.status})

    async def _health(self, request: web.Request) -> web.StreamResponse:
        busy = {j.worker_id for j in self.book.jobs.values() if j.status == IN_PROGRESS}
        alive = [w for w in self.workers.values() if w.alive]
        up = [w for w in alive if w.first_poll is not None]
        running = sum(1 for w in up if w.id in busy)
        return web.json_response({
            "jobs": self.book.health(),
            "workers": {"idle": len(up) - running, "running": running, "initializing": len(alive) - len(up)},
        })

    async def _purge(self, request: web.Request) -> web.StreamResponse:
        removed = self.book.purge()
        await self.book.notify()
        return web.json_response({"removed": removed, "status": "completed"})

    # -- worker queue ----------------------------------------------------------------
    async def _job_take(self, request: web.Request) -> web.StreamResponse:
        worker = self._worker(request.match_info["worker"])
        if worker.first_poll is None:
            worker.first_poll = time.monotonic()
            if worker.proc is not None:
                self.cold_starts.append((worker.id, worker.first_poll - worker.spawned))
        batch = "job-take-batch" in request.path
        count = max(1, int(request.query.get("batch_size", 1))) if batch else 1
        deadline = time.monotonic() + self.long_poll_s
        async with self.book.changed:
            while True:
                if self._stopping:
                    return web.Response(status=204)
                if not self._can_take(worker, request):
                    return web.Response(status=204)
                if not self.faults.stuck and time.monotonic() >= worker.ready_at and self.book.queue:
                    start_up = max(worker.ready_at, worker.first_poll or 0.0) - worker.spawned
                    cold = max(0.0, start_up) if worker.jobs_taken == 0 else 0.0
                    taken, doomed = self.book.take(worker.id, count, cold)
                    worker.jobs_taken += len(taken)
                    if taken:
                        break
                    continue  # everything handed out failed by the failure fault; keep waiting
                if not await self.book.wait_changed(deadline):
                    return web.Response(status=204)
        if doomed:  # the crash fault: this worker dies shortly after taking the job
            asyncio.get_running_loop().create_task(self._crash_later(worker.id, self.faults.crash_after_s))
        jobs = [{"id": j.id, "input": j.input} for j in taken]
        return web.json_response(jobs if batch else jobs[0])

    @staticmethod
    def _can_take(worker: WorkerInfo, request: web.Request) -> bool:
        # A killed worker's long-poll lingers server-side; it must not be handed a job nobody will run.
        if worker.proc is not None and worker.proc.poll() is not None:
            return False
        transport = request.transport
        return transport is not None and not transport.is_closing()

    async def _body(self, request: web.Request) -> dict[str, Any]:
        # The SDK posts JSON with a form content type (rp_http._transmit).
        try:
            body = json.loads(await request.read())
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    async def _job_done(self, request: web.Request) -> web.StreamResponse:
        self._worker(request.match_info["worker"])
        job = self._lookup(request)
        body = await self._body(request)
        if job is not None:
            self.book.done(job, body)
            await self.book.notify()
        return web.json_response({})

    async def _job_stream(self, request: web.Request) -> web.StreamResponse:
        self._worker(request.match_info["worker"])
        job = self._lookup(request)
        if job is not None:
            self.book.streamed(job, await self._body(request))
            await self.book.notify()
        return web.json_response({})

    async def _job_stop(self, request: web.Request) -> web.StreamResponse:
        worker = self._worker(request.match_info["worker"])
        deadline = time.monotonic() + self.long_poll_s
        async with self.book.changed:
            while not self._stopping:
                pending = self.book.stop_signals.pop(worker.id, None)
                if pending:
                    return web.json_response({"jobsToStop": pending})
                if not await self.book.wait_changed(deadline):
                    break
        return web.Response(status=204)

    async def _ping(self, request: web.Request) -> web.StreamResponse:
        self._worker(request.match_info["worker"])
        return web.json_response({})

    # -- admin -------------------------------------------------------------------------
    async def _set_faults(self, changes: dict[str, Any]) -> None:
        self.faults.update(**changes)
        await self.book.notify()

    async def _admin_faults(self, request: web.Request) -> web.StreamResponse:
        try:
            await self._set_faults(await request.json())
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(asdict(self.faults))

    async def _state(self) -> dict[str, Any]:
        return {
            "endpoint_id": self.endpoint_id,
            "faults": asdict(self.faults),
            "jobs": {j.id: j.status_dict() for j in self.book.jobs.values()},
            "workers": {w.id: {"alive": w.alive, "exit_code": w.exit_code, "first_poll": w.first_poll is not None}
                        for w in self.workers.values()},
            "cold_starts": self.cold_starts,
            #: seconds RunPod would bill for each job (cold start it woke + run + idle timeout)
            "billed_seconds": {j.id: j.billed_seconds(self.faults.idle_timeout_s) for j in self.book.jobs.values()},
        }

    async def _job_status(self, job_id: str) -> dict[str, Any] | None:
        job = self.book.jobs.get(job_id)
        return job.status_dict() if job else None

    async def _admin_state(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(await self._state())

    async def _admin_crash(self, request: web.Request) -> web.StreamResponse:
        await self._crash_all()
        return web.json_response({"crashed": True})

    async def _put_file(self, request: web.Request) -> web.StreamResponse:
        """A stand-in for a presigned upload URL: large inputs travel by URL."""
        self.files[request.match_info["name"]] = (await request.read(), request.content_type)
        return web.json_response({"url": f"{self.root_url}/_emulator/files/{request.match_info['name']}"})

    async def _get_file(self, request: web.Request) -> web.StreamResponse:
        found = self.files.get(request.match_info["name"])
        if found is None:
            return web.json_response({"error": "no such file"}, status=404)
        return web.Response(body=found[0], content_type=found[1])
