"""A loopback emulator of Replicate's hosted HTTP API in front of a real Cog runtime.

It speaks the ``/v1`` API the official ``replicate`` client and ``broker``'s adapter
use: token auth, predictions by version / model / deployment, ``Prefer: wait=N``,
cancel, an SSE stream per prediction, ``/v1/files``, models, deployments, hardware
and account. Each prediction is forwarded to the Cog runtime (``python -m
cog.server.http`` serving ``handlers/replicate``) as an async prediction whose
webhooks come back here; file outputs become delivery URLs that need the token, and
expire after an hour, as on Replicate. ``Faults`` make it fail, stall, throttle or
boot slowly on purpose.

    runtime = CogRuntime().start()
    with EmulatorServer(ReplicateEmulator(runtime.url, token="r8_test")) as server:
        client = replicate.Client(api_token="r8_test", base_url=server.url)
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import mimetypes
import random
import re
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any
from urllib.parse import unquote_to_bytes

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse

from broker.testing.replicate_catalog import CatalogRoutes, error_response, json_response
from broker.testing.replicate_state import Delivery, Faults, FileRecord, PredictionRecord, problem, version_json


def _wait_seconds(prefer: str | None) -> float | None:
    """``Prefer: wait`` (60 s) or ``Prefer: wait=N`` (1..60 s); None when absent."""
    if not prefer:
        return None
    match = re.search(r"\bwait(?:=(\d+))?\b", prefer)
    if match is None:
        return None
    return float(min(60, max(1, int(match.group(1) or 60))))


class ReplicateEmulator(CatalogRoutes):
    """Replicate's API state and routes. Serve ``app`` with ``EmulatorServer`` (or any ASGI server)."""

    def __init__(
        self,
        cog_url: str,
        *,
        token: str = "r8_emulator_token",
        owner: str = "broker",
        model: str = "broker",
        faults: Faults | None = None,
        seed: int | None = None,
        output_ttl_s: float = 3600.0,
    ) -> None:
        self.cog_url = cog_url.rstrip("/")
        self._token = token
        self.owner = owner
        self.faults = faults or Faults()
        self.output_ttl_s = output_ttl_s
        self.base_url = "http://127.0.0.1"
        self.models: dict[str, dict[str, Any]] = {f"{owner}/{model}": {"versions": [], "hardware": "gpu-l40s"}}
        self.deployments: dict[str, dict[str, Any]] = {}
        self.predictions: dict[str, PredictionRecord] = {}
        self.files: dict[str, FileRecord] = {}
        self.deliveries: dict[str, Delivery] = {}
        #: (method, path, status) of every API call, for tests that count retries
        self.calls: list[tuple[str, str, int]] = []
        self._signing_key = secrets.token_bytes(32)
        self._rng = random.Random(seed)
        self._booted_for: float = 0.0
        self._slot: asyncio.Lock | None = None
        self._http: httpx.AsyncClient | None = None
        self.default_model = f"{owner}/{model}"
        self.app = self._build_app()

    def __repr__(self) -> str:  # never show the token
        return f"<ReplicateEmulator {self.base_url} cog={self.cog_url}>"

    # -- set-up ---------------------------------------------------------------------
    async def _ensure_version(self, model_name: str) -> None:
        """Give a model with no version the runtime's schema as version 1 (what `cog push` would do)."""
        model = self.models[model_name]
        if model["versions"] or model_name != self.default_model:
            return
        schema: dict[str, Any] | None = None
        try:
            schema = (await self._client().get(f"{self.cog_url}/openapi.json", timeout=5.0)).json()
        except (httpx.HTTPError, ValueError):
            schema = None
        version_id = hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()
        model["versions"].append(version_json(version_id, schema, time.time()))

    def add_version(self, model_name: str, schema: dict[str, Any] | None = None) -> str:
        """Register a pushed version (tests; ``cog push`` against the real service)."""
        model = self.models.setdefault(model_name, {"versions": [], "hardware": "gpu-l40s"})
        version_id = secrets.token_hex(32)
        model["versions"].append(version_json(version_id, schema, time.time()))
        return version_id

    def cancel_in_flight(self, wait_s: float = 10.0) -> None:
        """Cancel what the runtime still runs for us and wait for it to stop (it may serve others next)."""
        running = [r for r in list(self.predictions.values()) if r.forwarded and not r.terminal]
        for record in running:
            try:
                httpx.post(f"{self.cog_url}/predictions/{record.id}/cancel", timeout=5.0)
            except httpx.HTTPError:
                pass
        deadline = time.monotonic() + wait_s
        while any(not r.terminal for r in running) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=30.0)
        return self._http

    # -- auth, faults, bookkeeping ---------------------------------------------------
    def _authorized(self, request: Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() in ("bearer", "token") and hmac.compare_digest(value.strip(), self._token)

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="Replicate emulator", openapi_url=None, docs_url=None, redoc_url=None)

        @app.middleware("http")
        async def gate(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
            path = request.url.path
            public = path.startswith("/_cog/") or path.startswith("/_emulator/") or "/download" in path
            response: Response
            if not public and self.faults.outage:
                response = error_response(503, "Service Unavailable")
            elif not public and not self._authorized(request):
                response = json_response(
                    problem(401, "You did not pass a valid authentication token", "Unauthenticated"), 401
                )
            else:
                response = await call_next(request)
            if not path.startswith("/_"):
                self.calls.append((request.method, path, response.status_code))
            return response

        self._routes(app)
        return app

    def _routes(self, app: FastAPI) -> None:
        # predictions
        app.post("/v1/predictions")(self.create_for_version)
        app.post("/v1/models/{owner}/{name}/predictions")(self.create_for_model)
        app.post("/v1/deployments/{owner}/{name}/predictions")(self.create_for_deployment)
        app.get("/v1/predictions")(self.list_predictions)
        app.get("/v1/predictions/{pid}")(self.get_prediction)
        app.post("/v1/predictions/{pid}/cancel")(self.cancel_prediction)
        app.get("/stream/{pid}")(self.stream_prediction)
        app.get("/delivery/{key}/{name}")(self.get_delivery)
        app.post("/_cog/webhook/{pid}")(self.cog_webhook)
        # files
        app.post("/v1/files")(self.create_file)
        app.get("/v1/files")(self.list_files)
        app.get("/v1/files/{fid}")(self.get_file)
        app.delete("/v1/files/{fid}")(self.delete_file)
        app.get("/v1/files/{fid}/download")(self.download_file)
        # models, deployments, account, hardware
        app.get("/v1/account")(self.account)
        app.get("/v1/hardware")(self.hardware)
        app.post("/v1/models")(self.create_model)
        app.get("/v1/models/{owner}/{name}")(self.get_model)
        app.get("/v1/models/{owner}/{name}/versions")(self.list_versions)
        app.get("/v1/models/{owner}/{name}/versions/{vid}")(self.get_version)
        app.get("/v1/deployments")(self.list_deployments)
        app.post("/v1/deployments")(self.create_deployment)
        app.get("/v1/deployments/{owner}/{name}")(self.get_deployment)
        app.patch("/v1/deployments/{owner}/{name}")(self.update_deployment)
        app.delete("/v1/deployments/{owner}/{name}")(self.delete_deployment)
        # the knobs, for `broker emulate replicate` users and tests in another process
        app.get("/_emulator/faults")(self.get_faults)
        app.post("/_emulator/faults")(self.set_faults)

    # -- predictions ----------------------------------------------------------------
    async def create_for_version(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        ref = str(body.get("version") or "")
        version_id = ref.rpartition(":")[2]
        for model_name in self.models:
            await self._ensure_version(model_name)
        for model_name, model in self.models.items():
            if any(v["id"] == version_id for v in model["versions"]):
                return await self._create(request, body, model_name, version_id, None)
        return error_response(422, f"Invalid version or not permitted: {ref!r}")

    async def create_for_model(self, owner: str, name: str, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        model_name = f"{owner}/{name}"
        if model_name not in self.models:
            return error_response(404, f"Model {model_name} not found")
        await self._ensure_version(model_name)
        versions = self.models[model_name]["versions"]
        if not versions:
            return error_response(404, f"Model {model_name} has no versions")
        return await self._create(request, body, model_name, versions[-1]["id"], None)

    async def create_for_deployment(self, owner: str, name: str, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        dep = self.deployments.get(f"{owner}/{name}")
        if dep is None:
            return error_response(404, f"Deployment {owner}/{name} not found")
        return await self._create(request, body, dep["model"], dep["version"], f"{owner}/{name}")

    async def _body(self, request: Request) -> dict[str, Any] | Response:
        if self.faults.rate_limit_burst > 0:
            self.faults.rate_limit_burst -= 1
            seconds = self.faults.retry_after_s
            return error_response(429, f"Request was throttled. Expected available in {seconds} second.",
                          {"Retry-After": str(seconds)})
        try:
            body = await request.json()
        except ValueError:
            return error_response(400, "Request body is not valid JSON")
        if not isinstance(body, dict) or not isinstance(body.get("input", {}), dict):
            return error_response(422, "input must be an object")
        return body

    async def _create(self, request: Request, body: dict[str, Any], model: str, version: str,
                      deployment: str | None) -> Response:
        record = PredictionRecord(
            id=secrets.token_hex(13), model=model, version=version, input=body.get("input") or {},
            deployment=deployment,
        )
        self.predictions[record.id] = record
        asyncio.get_running_loop().create_task(self._run(record))
        wait = _wait_seconds(request.headers.get("prefer"))
        if wait is not None:
            try:
                await asyncio.wait_for(record.done.wait(), wait)
            except TimeoutError:
                pass
        return json_response(record.to_json(self.base_url), 201)

    async def _run(self, record: PredictionRecord) -> None:
        """What Replicate's scheduler does: wait for a worker (boot it), then run on the Cog runtime."""
        faults = self.faults
        if faults.stuck:
            return
        if faults.setup_delay_s > 0 and self._booted_for != faults.setup_delay_s:
            self._booted_for = faults.setup_delay_s
            await asyncio.sleep(faults.setup_delay_s)
        if record.terminal:
            return
        if faults.fail_rate > 0 and self._rng.random() < faults.fail_rate:
            record.finish("failed", error="Prediction failed: the worker exited unexpectedly (emulated fault)")
            return
        if self._slot is None:
            self._slot = asyncio.Lock()
        async with self._slot:  # Cog has one slot and answers 409 when busy: queue here instead
            if record.terminal:
                return
            await self._forward(record)
            if record.forwarded:
                await record.done.wait()

    async def _forward(self, record: PredictionRecord) -> None:
        payload = {
            "id": record.id,
            "input": self._signed_inputs(record.input),
            "webhook": f"{self.base_url}/_cog/webhook/{record.id}",
            "webhook_events_filter": ["start", "output", "logs", "completed"],
        }
        for _ in range(100):
            try:
                resp = await self._client().post(
                    f"{self.cog_url}/predictions", json=payload, headers={"Prefer": "respond-async"}
                )
            except httpx.HTTPError as exc:
                record.finish("failed", error=f"the model container is unreachable: {type(exc).__name__}")
                return
            if resp.status_code == 409:  # another emulator shares this runtime; wait for the slot
                await asyncio.sleep(0.1)
                continue
            if resp.status_code >= 400:
                record.finish("failed", error=f"input rejected by the model: {resp.text[:500]}")
                return
            record.forwarded = True
            return
        record.finish("failed", error="the model container stayed busy")

    def _signed_inputs(self, value: Any) -> Any:
        """Replace our file-API URLs with signed download URLs the model can fetch without a token."""
        if isinstance(value, dict):
            return {k: self._signed_inputs(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._signed_inputs(v) for v in value]
        prefix = f"{self.base_url}/v1/files/"
        if isinstance(value, str) and value.startswith(prefix) and value[len(prefix):] in self.files:
            fid = value[len(prefix):]
            expiry = int(time.time()) + 3600
            return f"{prefix}{fid}/download?expiry={expiry}&signature={self._sign(fid, expiry)}"
        return value

    def _sign(self, fid: str, expiry: int) -> str:
        return hmac.new(self._signing_key, f"{fid}:{expiry}".encode(), hashlib.sha256).hexdigest()

    async def cog_webhook(self, pid: str, request: Request) -> Response:
        record = self.predictions.get(pid)
        if record is None or record.terminal:
            return Response(status_code=200)
        body = await request.json()
        status = body.get("status")
        if status in ("processing", "succeeded", "failed", "canceled"):
            record.start()
        outputs = body.get("output")
        if isinstance(outputs, list):
            for item in outputs[record.outputs_seen:]:
                record.add_output(self._deliver(item, record))
            # Cog sends webhooks concurrently, so an older, shorter list can arrive late.
            record.outputs_seen = max(record.outputs_seen, len(outputs))
        elif outputs is not None and status == "succeeded":
            record.add_output(self._deliver(outputs, record))
        logs = body.get("logs") or ""
        if len(logs) > len(record.logs):
            record.add_logs(logs[len(record.logs):])
        if status in ("succeeded", "failed", "canceled"):
            predict_time = (body.get("metrics") or {}).get("predict_time")
            record.finish(status, error=body.get("error"), predict_time=predict_time)
        return Response(status_code=200)

    def _deliver(self, item: Any, record: PredictionRecord) -> Any:
        """A file output (the runtime sends data URLs) becomes a delivery URL, as on replicate.delivery."""
        if not (isinstance(item, str) and item.startswith("data:")):
            return item
        header, _, payload = item[5:].partition(",")
        mime = header.split(";")[0] or "application/octet-stream"
        data = base64.b64decode(payload) if header.endswith(";base64") else unquote_to_bytes(payload)
        key = secrets.token_urlsafe(16)
        ext = mimetypes.guess_extension(mime) or ".bin"
        self.deliveries[key] = Delivery(data, mime, time.time() + self.output_ttl_s)
        return f"{self.base_url}/delivery/{key}/out-{len(record.output or [])}{ext}"

    async def get_delivery(self, key: str, name: str) -> Response:
        item = self.deliveries.get(key)
        if item is None or item.expires_at < time.time():
            self.deliveries.pop(key, None)
            return error_response(404, "Not found")
        return Response(item.data, media_type=item.mime)

    async def list_predictions(self) -> Response:
        items = sorted(self.predictions.values(), key=lambda r: r.created_at, reverse=True)
        results = [r.to_json(self.base_url) for r in items]
        return json_response({"next": None, "previous": None, "results": results})

    async def get_prediction(self, pid: str) -> Response:
        record = self.predictions.get(pid)
        if record is None:
            return error_response(404, "Not found.")
        return json_response(record.to_json(self.base_url))

    async def cancel_prediction(self, pid: str) -> Response:
        record = self.predictions.get(pid)
        if record is None:
            return error_response(404, "Not found.")
        if not record.terminal:
            if record.forwarded:
                try:
                    await self._client().post(f"{self.cog_url}/predictions/{pid}/cancel")
                    await asyncio.wait_for(record.done.wait(), 5.0)
                except (httpx.HTTPError, TimeoutError):
                    pass
            record.finish("canceled")
        return json_response(record.to_json(self.base_url))

    async def stream_prediction(self, pid: str, request: Request) -> Response:
        record = self.predictions.get(pid)
        if record is None:
            return error_response(404, "Not found.")

        async def events() -> AsyncIterator[str]:
            index = 0
            while True:
                changed = record.changed()
                while index < len(record.events):
                    yield record.sse(index)
                    index += 1
                    if record.events[index - 1][0] == "done":
                        return
                try:
                    await asyncio.wait_for(changed.wait(), 15.0)
                except TimeoutError:
                    yield ": keep-alive\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    # -- knobs ----------------------------------------------------------------------
    async def get_faults(self) -> Response:
        return json_response(self.faults.__dict__)

    async def set_faults(self, request: Request) -> Response:
        try:
            self.faults.update(**(await request.json()))
        except (KeyError, TypeError, ValueError) as exc:
            return error_response(422, str(exc))
        return json_response(self.faults.__dict__)


class EmulatorServer:
    """Serve an emulator on a loopback port in a background thread (uvicorn)."""

    def __init__(self, emulator: ReplicateEmulator, *, port: int = 0) -> None:
        import uvicorn

        self.emulator = emulator
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", port))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        emulator.base_url = self.url
        config = uvicorn.Config(emulator.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name=f"replicate-emulator-{self.port}", daemon=True)

    def start(self) -> EmulatorServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.emulator.cancel_in_flight()
        self._server.should_exit = True
        self._thread.join(timeout=5)
        self._sock.close()

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
