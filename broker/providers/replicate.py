"""Replicate: predictions on a deployment, a model or a version, over Replicate's HTTP API.

Facts this relies on (https://replicate.com/docs/reference/http and /docs/topics/predictions,
read 2026-11-23; checked against the replicate 1.0.7 client):

* ``POST /v1/deployments/{o}/{n}/predictions``, ``/v1/models/{o}/{n}/predictions`` or
  ``/v1/predictions`` (with ``version``) creates a prediction; ``Prefer: wait=N`` (1-60 s)
  holds the request until it finishes or N s pass. Then ``GET /v1/predictions/{id}`` polls
  and ``POST .../cancel`` cancels. Statuses: starting, processing, succeeded, failed, canceled.
* A 429 carries ``Retry-After``; the official client never retries a POST, so we do (briefly).
* ``urls.stream`` is a server-sent-event stream of ``output``/``logs``/``error``/``done``.
* File inputs: a data URL up to 256 KB, larger through ``POST /v1/files``. File outputs are
  URLs that Replicate deletes after an hour: we download them (with the token) as soon as a
  prediction succeeds.
* Billing: public models bill ``metrics.predict_time``; private models and deployments also
  bill setup and idle time (https://replicate.com/docs/topics/billing).

The model is ``handlers/replicate`` (a Cog runner): input ``job`` (the wire job as JSON) and
``files`` (the MEDIA the job refers to as ``{"file": i}``), output a list of JSON files
(a result, or one chunk per streamed piece).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
from pydantic import SecretStr

from broker import wire
from broker.engines import SPEECH_ENGINES
from broker.errors import (
    AuthenticationFailed,
    BrokerError,
    ConfigurationError,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    JobLost,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
    error_from_dict,
)
from broker.media import Audio, AudioChunk, Video
from broker.providers.base import Billing, Capabilities, HealthReport, Job, JobState, Provider, Request
from broker.providers.readiness import replicate_unmet
from broker.settings import ReplicateSettings, Settings
from broker.types import DEFAULT_LIMITS, Limits, SpeechRequest

log = logging.getLogger(__name__)

NAME = "replicate"
#: Replicate's advice: data URLs for files up to 256 KB, the files API above that
INLINE_MAX_BYTES = 256 * 1024
#: a 429 whose Retry-After is at most this is waited out here; longer ones go to the manager
MAX_RETRY_AFTER_S = 5.0
RATE_LIMIT_RETRIES = 2

_EXT = {"audio/flac": "flac", "audio/wav": "wav", "image/png": "png", "image/jpeg": "jpg", "image/gif": "gif",
        "image/bmp": "bmp", "image/webp": "webp", "video/mp4": "mp4"}


class ReplicateJob(Job):
    """One prediction. Terminal states are applied once, with the outputs already downloaded."""

    def __init__(self, provider: ReplicateProvider, request: Request | None, prediction: dict[str, Any],
                 *, stream: bool) -> None:
        super().__init__(provider.name, str(prediction["id"]), request)
        self._provider = provider
        self._streaming = stream
        self._chunks: list[AudioChunk] = []
        self.prediction = prediction

    async def _refresh(self) -> None:
        await self._apply(await self._provider._get_prediction(self.id))

    async def _apply(self, prediction: dict[str, Any], output: Audio | Video | None = None) -> None:
        self.prediction = prediction
        status = prediction.get("status")
        if status == "starting":
            waited = time.time() - self.timestamps[JobState.QUEUED.value]
            timeout = self._provider.queue_timeout_s
            if timeout is not None and waited > timeout:
                # Refused now, the cancel stays pending: whoever holds the job asks again (Job.cancel).
                try:
                    self.cancel_pending = not await self._cancel()
                except BrokerError as exc:
                    log.info("cancel of replicate prediction %s refused for now: %s", self.id, exc.message)
                    self.cancel_pending = True
                if self.state.terminal:
                    return
                self._fail(ProviderUnavailable(
                    f"prediction {self.id} still starting after {waited:.0f}s (no worker came up)",
                    provider=self.provider, job_id=self.id))
            return
        if status == "processing":
            self._set_state(JobState.RUNNING)
            return
        if status not in ("succeeded", "failed", "canceled"):
            self._fail(JobLost(f"prediction {self.id} has unknown status {status!r}", provider=self.provider,
                               job_id=self.id), JobState.LOST)
            return
        if "running" not in self.timestamps and prediction.get("started_at"):
            self._set_state(JobState.RUNNING)
        self.billing = self._provider.bill(prediction)
        if status == "canceled":
            self._fail(JobCancelled(f"prediction {self.id} was cancelled on Replicate"), JobState.CANCELLED)
            return
        if status == "failed":
            self._fail(failure(prediction.get("error"), self.provider, self.id))
            return
        try:
            out = output if output is not None else await self._decode(prediction.get("output"))
        except BrokerError as exc:
            self._fail(exc, JobState.LOST if isinstance(exc, JobLost) else JobState.FAILED)
            return
        self._succeed(out)

    def _set_state(self, state: JobState) -> None:
        super()._set_state(state)
        if state.terminal and getattr(self, "prediction", {}).get("status") in ("succeeded", "failed", "canceled"):
            self.cancel_pending = False  # Replicate says it is over, whatever we asked

    async def _decode(self, output: Any) -> Audio | Video:
        items = output if isinstance(output, list) else [output]
        if not items or items == [None]:
            raise wire_bad_output(f"prediction {self.id} succeeded without output")
        payloads = [await self._provider._fetch_payload(item, self.id) for item in items]
        if not self._streaming:
            return wire.decode_result(payloads[-1], provider=self.provider)
        for payload in payloads:
            index, final, audio, text = wire.decode_chunk(payload, provider=self.provider)
            self._chunks.append(AudioChunk(audio, index, final=final, text=text))
        return Audio.concat([c.audio for c in self._chunks])

    async def _cancel(self) -> bool:
        """One cancel request; True once Replicate shows the prediction ended (429/5xx raise: asked again)."""
        try:
            prediction = await self._provider._request("POST", f"/predictions/{self.id}/cancel", what="cancel")
        except ProviderError as exc:
            if exc.status_code == 404:
                return True  # gone: it cannot run
            raise
        if prediction.get("status") not in ("succeeded", "failed", "canceled"):
            return False
        self.prediction = prediction
        self.billing = self._provider.bill(prediction)
        return True

    async def stream(self) -> AsyncIterator[AudioChunk]:
        if not self._streaming:
            async for chunk in super().stream():
                yield chunk
            return
        # Poll until a worker picks the prediction up: a stuck one times out here, not on a silent stream.
        polls = 0
        while self._state == JobState.QUEUED:
            await self.poll()
            if self._state == JobState.QUEUED:
                await asyncio.sleep(self.poll_schedule[min(polls, len(self.poll_schedule) - 1)])
                polls += 1
        url = (self.prediction.get("urls") or {}).get("stream")
        if self._state.terminal or not url:
            await self.wait()
            if self.error is not None:
                raise self.error
            for chunk in self._chunks:
                yield chunk
            return
        pieces: list[Audio] = []
        try:
            async for event, data in self._provider._sse(url):
                if event == "output":
                    payload = await self._provider._fetch_payload(data, self.id)
                    index, final, audio, text = wire.decode_chunk(payload, provider=self.provider)
                    self._set_state(JobState.RUNNING)
                    pieces.append(audio)
                    yield AudioChunk(audio, index, final=final, text=text)
                elif event == "error":
                    detail = _json_or_text(data)
                    raise failure(detail.get("detail") if isinstance(detail, dict) else detail, self.provider,
                                  self.id)
                elif event == "done":
                    reason = _json_or_text(data)
                    if isinstance(reason, dict) and reason.get("reason") == "canceled":
                        raise JobCancelled(f"prediction {self.id} was cancelled on Replicate")
                    break
        except JobCancelled as exc:
            self._fail(exc, JobState.CANCELLED)
            raise
        except BrokerError as exc:
            self._fail(exc)
            raise
        # One last look for the final state and the bill; the chunks are already here.
        await self._apply(await self._provider._get_prediction(self.id), Audio.concat(pieces) if pieces else None)
        if self.error is not None:
            raise self.error


class ReplicateProvider(Provider):
    name = NAME
    kind = NAME
    install_hint = "pip install 'broker[replicate]'"

    def __init__(
        self,
        *,
        api_token: SecretStr | str,
        deployment: str | None = None,
        model: str | None = None,
        version: str | None = None,
        base_url: str = "https://api.replicate.com/v1",
        hardware: str = "gpu-l40s",
        queue_timeout_s: float | None = 120.0,
        wait_s: int = 5,
        private: bool | None = None,
        idle_billed_s: float = 0.0,
        inline_max_bytes: int = INLINE_MAX_BYTES,
        limits: Limits = DEFAULT_LIMITS,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout_s: float = 30.0,
        name: str | None = None,
    ) -> None:
        if name:
            self.name = name
        self._token = api_token if isinstance(api_token, SecretStr) else SecretStr(api_token)
        if not self._token.get_secret_value():
            raise ConfigurationError("Replicate needs an API token: set REPLICATE_API_TOKEN")
        if deployment:
            self.target, self._create_path = f"deployment {deployment}", f"/deployments/{_pair(deployment)}/predictions"
        elif version:
            self.target, self._create_path = f"version {version}", "/predictions"
        elif model:
            self.target, self._create_path = f"model {model}", f"/models/{_pair(model)}/predictions"
        else:
            raise ConfigurationError(
                "Replicate needs a deployment, model or version: set replicate.deployment "
                "(BROKER_REPLICATE__DEPLOYMENT) or run `broker deploy replicate`"
            )
        self.deployment, self.model = deployment, model
        self.version = version.rpartition(":")[2] if version else None
        self.base_url = base_url.rstrip("/")
        self.queue_timeout_s = queue_timeout_s
        self.wait_s = max(0, min(60, int(wait_s)))
        # Deployments are private: they bill boot and idle time as well as predict time.
        self.private = private if private is not None else bool(deployment)
        self.idle_billed_s = idle_billed_s
        self.inline_max_bytes = inline_max_bytes
        self.limits = limits
        # A remote image's engines cannot be seen from here: the built-ins unless its endpoint says
        # (`engines = [...]`); broker_worker's own default is what *this* process has.
        self.capabilities = Capabilities.broker_worker(hardware, engines=frozenset(SPEECH_ENGINES))
        self._transport = transport
        self._timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, endpoint: str | None = None,
                      config: ReplicateSettings | None = None, **overrides: Any) -> ReplicateProvider:
        """The endpoint ``endpoint`` (``config``: its [endpoints.NAME] table; default: the [replicate] section)."""
        cfg = config or settings.replicate
        name = endpoint or NAME
        unmet = replicate_unmet(cfg, name, overrides)
        if unmet is not None:
            raise unmet
        kwargs: dict[str, Any] = {
            "api_token": cfg.api_token, "deployment": cfg.deployment, "model": cfg.model, "version": cfg.version,
            "base_url": cfg.base_url, "hardware": cfg.hardware, "queue_timeout_s": cfg.queue_timeout_s,
            "wait_s": cfg.wait_s, "private": cfg.private, "idle_billed_s": cfg.idle_billed_s,
            "inline_max_bytes": cfg.inline_max_bytes, "limits": settings.limits, "name": name,
        }
        kwargs.update(overrides)
        provider = cls(**kwargs)
        # A deployment runs one prediction per instance at a time, up to max_instances.
        provider.max_concurrency = cfg.max_concurrency or (cfg.max_instances if cfg.deployment else None)
        return provider

    def __repr__(self) -> str:
        return f"<ReplicateProvider {self.target} at {self.base_url}>"

    # -- the lifecycle -----------------------------------------------------------------
    async def submit(self, request: Request, *, stream: bool = False) -> Job:
        request.check_limits(self.limits)
        stream = stream and isinstance(request, SpeechRequest)
        payload = wire.encode_request(request, stream=stream)
        files: list[str] = []
        payload["input"] = await self._externalize(payload["input"], files)
        body: dict[str, Any] = {"input": {"job": json.dumps(payload, separators=(",", ":"))}}
        if files:
            body["input"]["files"] = files
        if self.version:
            body["version"] = self.version
        wait = 0 if stream else self.wait_s
        headers = {"Prefer": f"wait={wait}"} if wait else {}
        prediction = await self._create(body, headers, read_timeout=wait + self._timeout_s)
        job = ReplicateJob(self, request, prediction, stream=stream)
        await job._apply(prediction)
        return job

    async def _create(self, body: dict[str, Any], headers: dict[str, str], *, read_timeout: float) -> dict[str, Any]:
        for attempt in range(RATE_LIMIT_RETRIES + 1):
            try:
                return await self._request("POST", self._create_path, json=body, headers=headers,
                                           what=f"create a prediction on {self.target}", read_timeout=read_timeout)
            except RateLimited as exc:
                wait = exc.retry_after if exc.retry_after is not None else 1.0
                if attempt == RATE_LIMIT_RETRIES or wait > MAX_RETRY_AFTER_S:
                    raise
                log.info("replicate throttled the create; retrying in %.1fs", wait)
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def health(self) -> HealthReport:
        started = time.perf_counter()
        try:
            account = await self._request("GET", "/account", what="read the account")
            info: dict[str, Any] = {"account": account.get("username")}
            if self.deployment:
                dep = await self._request("GET", f"/deployments/{_pair(self.deployment)}", what="read the deployment")
                info["release"] = (dep.get("current_release") or {}).get("configuration")
            elif self.model and not self.version:
                model = await self._request("GET", f"/models/{_pair(self.model)}", what="read the model")
                if not model.get("latest_version"):
                    return HealthReport(ok=False, detail=f"model {self.model} has no version yet")
        except BrokerError as exc:
            return HealthReport(ok=False, detail=exc.message, latency_s=time.perf_counter() - started)
        return HealthReport(ok=True, detail=f"{self.target} reachable", latency_s=time.perf_counter() - started,
                            info=info)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._client_loop is asyncio.get_running_loop():
            await client.aclose()

    def attach(self, job_id: str) -> ReplicateJob:
        """A prediction created earlier (maybe by a process that died), to poll, cancel and bill by id."""
        return ReplicateJob(self, None, {"id": job_id, "status": "starting"}, stream=False)

    def bill(self, prediction: dict[str, Any]) -> Billing:
        """Seconds a finished prediction bills, from its metrics and timestamps (priced by the money layer)."""
        metrics = prediction.get("metrics") or {}
        predict_s = float(metrics.get("predict_time") or 0.0)
        created, started = _ts(prediction.get("created_at")), _ts(prediction.get("started_at"))
        setup_s = max(0.0, started - created) if created is not None and started is not None else 0.0
        billed = predict_s + (setup_s + self.idle_billed_s if self.private else 0.0)
        hardware = self.capabilities.hardware
        return Billing(billed_seconds=billed, estimated=True, hardware=hardware, queue_seconds=setup_s,
                       run_seconds=predict_s)

    # -- HTTP ------------------------------------------------------------------------
    def _http(self) -> httpx.AsyncClient:
        # One client per event loop: the sync twins and each async test run their own loop.
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                headers={"Authorization": f"Bearer {self._token.get_secret_value()}", "User-Agent": "broker"},
                transport=self._transport,
                timeout=httpx.Timeout(self._timeout_s),
                follow_redirects=True,
            )
            self._client_loop = loop
        return self._client

    async def _request(self, method: str, path: str, *, what: str, read_timeout: float | None = None,
                       **kwargs: Any) -> dict[str, Any]:
        timeout = httpx.Timeout(self._timeout_s, read=read_timeout) if read_timeout else httpx.USE_CLIENT_DEFAULT
        try:
            resp = await self._http().request(method, path, timeout=timeout, **kwargs)
        except httpx.TransportError as exc:
            raise ProviderUnavailable(f"cannot reach Replicate to {what}: {type(exc).__name__}",
                                      provider=NAME) from None
        if resp.status_code >= 400:
            raise http_error(resp, what)
        data: dict[str, Any] = resp.json() if resp.content else {}
        return data

    async def _get_prediction(self, prediction_id: str) -> dict[str, Any]:
        try:
            return await self._request("GET", f"/predictions/{prediction_id}", what="read a prediction")
        except ProviderError as exc:
            if exc.status_code == 404:
                raise JobLost(f"Replicate no longer knows prediction {prediction_id}", provider=NAME,
                              job_id=prediction_id) from None
            raise

    async def _externalize(self, node: Any, files: list[str]) -> Any:
        """MEDIA objects become ``{"file": i}`` and the i-th file input: a data URL, or an upload."""
        if isinstance(node, list):
            return [await self._externalize(item, files) for item in node]
        if not isinstance(node, dict):
            return node
        if set(node) == {"b64", "mime"}:
            data = base64.b64decode(node["b64"])
            mime = _sniff_mime(data, str(node["mime"]))
            if len(data) <= self.inline_max_bytes:
                files.append(f"data:{mime};base64,{node['b64']}")
            else:
                files.append(await self._upload(data, mime, f"input-{len(files)}.{_EXT.get(mime, 'bin')}"))
            return {"file": len(files) - 1, "mime": mime}
        return {key: await self._externalize(value, files) for key, value in node.items()}

    async def _upload(self, data: bytes, mime: str, filename: str) -> str:
        created = await self._request("POST", "/files", files={"content": (filename, data, mime)},
                                      what="upload an input file")
        url = (created.get("urls") or {}).get("get")
        if not url:
            raise ProviderError("Replicate's files API returned no URL", provider=NAME)
        return str(url)

    async def _fetch_payload(self, item: Any, prediction_id: str) -> Any:
        """An output item as a wire payload: inline JSON, a data URL, or a file URL (downloaded with the token)."""
        if isinstance(item, dict):
            return item
        text = str(item)
        try:
            if text.startswith("data:"):
                raw = base64.b64decode(text.partition(",")[2])
            elif text.startswith(("http://", "https://")):
                raw = await self._download(text, prediction_id)
            else:
                raw = text.encode()
            return json.loads(raw)
        except (ValueError, TypeError):
            raise wire_bad_output(f"prediction {prediction_id} returned an output that is not a job payload") from None

    async def _download(self, url: str, prediction_id: str) -> bytes:
        try:
            resp = await self._http().get(url, timeout=httpx.Timeout(self._timeout_s, read=120.0))
        except httpx.TransportError as exc:
            raise ProviderUnavailable(f"cannot download an output: {type(exc).__name__}", provider=NAME) from None
        if resp.status_code in (404, 410):
            raise JobLost(f"the output of prediction {prediction_id} is gone (Replicate keeps outputs an hour)",
                          provider=NAME, job_id=prediction_id)
        if resp.status_code >= 400:
            raise http_error(resp, "download an output")
        return resp.content

    async def _sse(self, url: str) -> AsyncIterator[tuple[str, str]]:
        """Server-sent events as (event, data) pairs."""
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
        timeout = httpx.Timeout(self._timeout_s, read=120.0)
        data: list[str]
        try:
            async with self._http().stream("GET", url, headers=headers, timeout=timeout) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise http_error(resp, "stream a prediction")
                event, data = "message", []
                async for line in resp.aiter_lines():
                    if not line:
                        if data:
                            yield event, "\n".join(data)
                        event, data = "message", []
                    elif line.startswith(":"):
                        continue
                    else:
                        field, _, value = line.partition(":")
                        value = value[1:] if value.startswith(" ") else value
                        if field == "event":
                            event = value
                        elif field == "data":
                            data.append(value)
        except httpx.TransportError as exc:
            raise ProviderUnavailable(f"the Replicate stream broke: {type(exc).__name__}", provider=NAME) from None


# -- mapping Replicate's answers onto broker's errors ---------------------------------------
def http_error(resp: httpx.Response, what: str) -> BrokerError:
    """The typed error for an HTTP error answer (never includes request headers)."""
    try:
        body = resp.json()
        detail = str(body.get("detail") or body.get("title") or body)
    except ValueError:
        detail = resp.text[:300] or resp.reason_phrase
    status = resp.status_code
    message = f"Replicate could not {what} ({status}): {detail}"
    if status in (401, 403):
        return AuthenticationFailed(message, provider=NAME, status_code=status)
    if status == 429:
        return RateLimited(message, provider=NAME, status_code=status, retry_after=_retry_after(resp))
    if status == 404:
        return ProviderUnavailable(message + " (is it deployed? `broker deploy replicate`)", provider=NAME,
                                   status_code=status, retryable=False)
    if status == 422 and what.startswith("create a prediction"):
        # Cog validated the input against the model's schema and refused it: so would any other provider.
        return InvalidRequest("input", message)
    if status in (400, 409, 422):
        return JobFailed(message, provider=NAME, status_code=status, retryable=False)
    return ProviderUnavailable(message, provider=NAME, status_code=status)


def failure(error: Any, provider: str, job_id: str) -> BrokerError:
    """A failed prediction's ``error``: a broker error payload keeps its type; anything else is JobFailed."""
    if isinstance(error, str):
        parsed = _json_or_text(error)
        error = parsed if isinstance(parsed, dict) else error
    if isinstance(error, dict):
        if isinstance(error.get("error"), dict):
            error = error["error"]
        if "type" in error:
            return error_from_dict(error, provider=provider)
    return JobFailed(f"prediction {job_id} failed on Replicate: {error or 'no reason given'}", provider=provider,
                     job_id=job_id)


def wire_bad_output(message: str) -> BrokerError:
    return error_from_dict({"type": "BadOutput", "message": message}, provider=NAME)


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after", "").strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _json_or_text(data: Any) -> Any:
    try:
        return json.loads(data)
    except (TypeError, ValueError):
        return data


def _pair(name: str) -> str:
    owner, _, model = name.partition("/")
    if not owner or not model or "/" in model:
        raise ConfigurationError(f"expected 'owner/name', got {name!r}")
    return f"{owner}/{model}"


def _ts(value: Any) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _sniff_mime(data: bytes, declared: str) -> str:
    """A concrete MIME type for a data URL (wire avatars say only ``image/*``)."""
    if "*" not in declared and declared:
        return declared
    for magic, mime in ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
                        (b"BM", "image/bmp"), (b"fLaC", "audio/flac")):
        if data.startswith(magic):
            return mime
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith(b"RIFF"):
        return "audio/wav"
    return "application/octet-stream"
