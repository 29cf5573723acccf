"""RunPod serverless, through its hosted queue API: ``/v2/{endpoint}/run|runsync|status|stream|cancel|health``.

Spoken with httpx rather than the ``runpod`` SDK client (its retry adapter is mounted for
http:// only and its asyncio client wraps ``input`` a second time), so tests run this exact
code against ``broker.testing.runpod_emulator`` with the real SDK worker behind it.

Facts used here (docs.runpod.io/serverless/endpoints/send-requests and
/serverless/endpoints/operation-reference, read 2026-11-23):

- ``/run`` takes at most 10 MB and keeps results 30 minutes; ``/runsync`` takes 20 MB, keeps 1 minute,
  and waits ``?wait=`` ms (1000-300000) before answering with the job still running.
- ``policy.executionTimeout`` is in ms and must be > 5000; ``policy.ttl`` (the job's whole lifetime)
  in ms, >= 10000 and at most one week.
- Job statuses: IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, CANCELLED, TIMED_OUT; ``delayTime`` and
  ``executionTime`` in ms. ``/stream`` returns the chunks produced since the previous call.
- 401 = bad key, 404 = unknown endpoint or job, 429 = rate or queue limit.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx
from pydantic import SecretStr

from broker import wire
from broker.errors import (
    AuthenticationFailed,
    BadOutput,
    BrokerError,
    ConfigurationError,
    InvalidRequest,
    JobLost,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
)
from broker.providers.base import Billing, Capabilities, HealthReport, Job, Provider, Request
from broker.providers.readiness import runpod_unmet
from broker.providers.runpod_job import RunPodJob, decode_output, runpod_error
from broker.settings import RunPodSettings, Settings
from broker.types import DEFAULT_LIMITS, Limits, SpeechRequest

__all__ = ["RunPodJob", "RunPodProvider", "decode_output", "runpod_error"]

DEFAULT_BASE_URL = "https://api.runpod.ai/v2"
#: payload limits, taken as decimal megabytes so we stay on the safe side of either reading
RUN_LIMIT_BYTES = 10_000_000
RUNSYNC_LIMIT_BYTES = 20_000_000
_MIN_EXECUTION_TIMEOUT_MS = 5_001
_MIN_TTL_MS = 10_000
_MAX_TTL_MS = 7 * 24 * 3600 * 1000

#: ``uploader(data, mime) -> url``: puts a large input somewhere the worker can GET it
Uploader = Callable[[bytes, str], Awaitable[str]]


class RunPodProvider(Provider):
    """Jobs on one RunPod serverless endpoint that runs ``handlers/runpod/handler.py``."""

    name = "runpod"
    kind = "runpod"
    install_hint = "pip install 'broker[runpod]'"

    def __init__(
        self,
        endpoint_id: str,
        api_key: SecretStr | str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        hardware: str = "A100-80GB",
        engines: Sequence[str] = ("piper",),
        queue_timeout_s: float | None = 60.0,
        execution_timeout_s: float = 600.0,
        ttl_s: float | None = None,
        use_runsync: bool = False,
        runsync_max_s: float = 20.0,
        idle_timeout_s: float = 5.0,
        limits: Limits = DEFAULT_LIMITS,
        uploader: Uploader | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        request_timeout_s: float = 30.0,
        name: str | None = None,
    ) -> None:
        if name:
            self.name = name
        if not endpoint_id:
            raise ConfigurationError("RunPod needs an endpoint id")
        key = api_key if isinstance(api_key, SecretStr) else SecretStr(api_key)
        if not key.get_secret_value():
            raise ConfigurationError("RunPod needs an API key (RUNPOD_API_KEY)")
        self.endpoint_id = endpoint_id
        self.base_url = base_url.rstrip("/")
        self.hardware = hardware
        self.queue_timeout_s = queue_timeout_s
        self.execution_timeout_s = execution_timeout_s
        self.ttl_s = ttl_s
        self.use_runsync = use_runsync
        self.runsync_max_s = runsync_max_s
        #: the endpoint's idle timeout: RunPod bills each worker this long after its last job
        self.idle_timeout_s = idle_timeout_s
        self.limits = limits
        self.uploader = uploader
        self.capabilities = Capabilities.broker_worker(
            hardware, engines=frozenset(engines), max_payload_bytes=RUNSYNC_LIMIT_BYTES
        )
        self._key = key
        self._transport = transport
        self._timeout = request_timeout_s
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, endpoint: str | None = None, config: RunPodSettings | None = None,
                      **overrides: Any) -> RunPodProvider:
        """The endpoint ``endpoint`` (``config``: its [endpoints.NAME] table; default: the [runpod] section)."""
        rp = config or settings.runpod
        name = endpoint or cls.name
        unmet = runpod_unmet(rp, name, overrides)
        if unmet is not None:
            raise unmet
        kwargs: dict[str, Any] = {
            "endpoint_id": rp.endpoint_id,
            "api_key": rp.api_key,
            "base_url": rp.base_url,
            "hardware": rp.hardware,
            "engines": tuple(rp.engines if rp.engines is not None else ("piper",)),
            "queue_timeout_s": rp.queue_timeout_s,
            "execution_timeout_s": rp.execution_timeout_s,
            "ttl_s": rp.ttl_s,
            "use_runsync": rp.use_runsync,
            "runsync_max_s": rp.runsync_max_s,
            "idle_timeout_s": float(rp.idle_timeout_s),
            "limits": settings.limits,
            "name": name,
        }
        kwargs.update(overrides)
        provider = cls(**kwargs)
        # RunPod runs at most workers_max jobs at once on an endpoint (one per worker).
        provider.max_concurrency = rp.max_concurrency or rp.workers_max
        return provider

    def __repr__(self) -> str:
        return f"<RunPodProvider {self.name} endpoint={self.endpoint_id}>"

    # -- HTTP ------------------------------------------------------------------------
    def _http(self) -> httpx.AsyncClient:
        # A client's connections belong to the loop that opened them; sync callers and tests
        # may drive us from several loops over our lifetime.
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop or self._client.is_closed:
            self._client = httpx.AsyncClient(
                base_url=f"{self.base_url}/{self.endpoint_id}/",
                transport=self._transport,
                timeout=self._timeout,
                headers={"Authorization": f"Bearer {self._key.get_secret_value()}"},
            )
            self._client_loop = loop
        return self._client

    async def call(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        job_id: str | None = None,
    ) -> dict[str, Any]:
        """One request to the hosted API; HTTP failures become typed errors, never httpx's."""
        headers = {"Content-Type": "application/json"} if content is not None else None
        try:
            resp = await self._http().request(
                method, path, content=content, params=params, headers=headers,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.TimeoutException:
            raise ProviderUnavailable(f"RunPod did not answer {method} /{path} in time", provider=self.name,
                                      job_id=job_id) from None
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"RunPod is unreachable: {type(exc).__name__}: {exc}", provider=self.name,
                                      job_id=job_id) from None
        return self._decode(resp, method, path, job_id)

    def _decode(self, resp: httpx.Response, method: str, path: str, job_id: str | None) -> dict[str, Any]:
        code = resp.status_code
        where = f"{method} /{path.split('/')[0]}"
        if code in (401, 403):
            raise AuthenticationFailed(
                f"RunPod rejected the API key (HTTP {code}) for endpoint {self.endpoint_id}; "
                "check RUNPOD_API_KEY", provider=self.name, status_code=code, job_id=job_id)
        if code == 429:
            retry_after = _retry_after(resp.headers.get("Retry-After"))
            raise RateLimited(f"RunPod is rate limiting {where} (HTTP 429)", provider=self.name,
                              retry_after=retry_after, status_code=code, job_id=job_id)
        if code == 404:
            if job_id is not None:
                raise JobLost(f"RunPod no longer knows job {job_id} (HTTP 404: expired or purged)",
                              provider=self.name, status_code=code, job_id=job_id)
            raise ProviderUnavailable(f"RunPod endpoint {self.endpoint_id} was not found (HTTP 404)",
                                      provider=self.name, retryable=False, status_code=code)
        if code == 413:
            raise InvalidRequest("input", "RunPod refused the job payload as too large (HTTP 413)")
        if code >= 500:
            raise ProviderUnavailable(f"RunPod failed on {where} (HTTP {code})", provider=self.name,
                                      status_code=code, job_id=job_id)
        if code in (400, 422) and job_id is None:
            # RunPod refused the job we submitted as such: no endpoint would take it either.
            raise InvalidRequest("input", f"RunPod refused the job (HTTP {code}): {_snippet(resp)}")
        if code >= 400:
            raise ProviderError(f"RunPod rejected {where} (HTTP {code}): {_snippet(resp)}", provider=self.name,
                                retryable=False, status_code=code, job_id=job_id)
        try:
            data = resp.json()
        except ValueError:
            raise ProviderUnavailable(f"RunPod answered {where} with something that is not JSON",
                                      provider=self.name, status_code=code, job_id=job_id) from None
        if not isinstance(data, dict):
            raise ProviderUnavailable(f"RunPod answered {where} with a {type(data).__name__}, not an object",
                                      provider=self.name, job_id=job_id)
        return data

    # -- jobs ------------------------------------------------------------------------
    def policy(self) -> dict[str, int]:
        """policy.executionTimeout and policy.ttl, clamped to what RunPod accepts."""
        exec_ms = max(_MIN_EXECUTION_TIMEOUT_MS, int(self.execution_timeout_s * 1000))
        ttl_s = self.ttl_s
        if ttl_s is None:
            ttl_s = (self.queue_timeout_s or 0.0) + self.execution_timeout_s + 60.0
        ttl_ms = min(_MAX_TTL_MS, max(_MIN_TTL_MS, int(ttl_s * 1000)))
        return {"executionTimeout": exec_ms, "ttl": ttl_ms}

    async def submit(self, request: Request, *, stream: bool = False) -> Job:
        request.check_limits(self.limits)
        why = self.capabilities.supports(request)
        if why is not None:
            raise InvalidRequest("engine", f"the RunPod endpoint {why}")
        streaming = stream and isinstance(request, SpeechRequest)
        body: dict[str, Any] = {"input": wire.encode_request(request, stream=streaming), "policy": self.policy()}
        data = _dumps(body)
        if len(data) > RUN_LIMIT_BYTES and self.uploader is not None:
            data = await self._offload(body)
        route = "run"
        if len(data) > RUN_LIMIT_BYTES:
            if streaming or len(data) > RUNSYNC_LIMIT_BYTES:
                limit = "10 MB on /run" if streaming else "20 MB on /runsync"
                raise InvalidRequest(
                    "input",
                    f"the job payload is {len(data) / 1e6:.1f} MB and RunPod accepts at most {limit}; "
                    "use shorter context audio or a smaller avatar, or give RunPodProvider an uploader "
                    "so large media travel by URL",
                )
            route = "runsync"  # the only door for 10-20 MB payloads
        elif self.use_runsync and not streaming and self._expected_run_seconds(request) <= self.runsync_max_s:
            route = "runsync"
        if route == "runsync":
            return await self._runsync(request, data)
        reply = await self.call("POST", "run", content=data)
        return self._job_from(reply, request, streaming)

    async def _runsync(self, request: Request, data: bytes) -> Job:
        # /runsync answers when the job ends or after `wait`, whichever is first; past that we poll.
        # Its job id only arrives with the answer, so a caller cancelling meanwhile cannot cancel the
        # remote job: that is why /runsync is reserved for short jobs (and opt-in).
        wait_ms = int(min(300_000, max(1_000, self.runsync_max_s * 1000)))
        reply = await self.call("POST", "runsync", content=data, params={"wait": wait_ms},
                                timeout=wait_ms / 1000 + self._timeout)
        return self._job_from(reply, request, False)

    def _job_from(self, reply: dict[str, Any], request: Request, streaming: bool) -> RunPodJob:
        job_id = reply.get("id")
        if not isinstance(job_id, str) or not job_id:
            raise BadOutput("RunPod accepted the job but returned no job id", provider=self.name)
        job = RunPodJob(self, request, job_id, streaming)
        job.expires_at = time.time() + self.policy()["ttl"] / 1000  # RunPod ends it by then, whatever we do
        job.apply(reply)
        return job

    def _expected_run_seconds(self, request: Request) -> float:
        """The quote's compute time (a cold start only delays the answer; /runsync then polls as usual)."""
        try:
            quote = self.quote(request)
            return float(quote.breakdown.get("run", quote.expected_seconds))
        except Exception:  # a quote is a hint here; no catalog row means "not known to be short"
            return float("inf")

    async def _offload(self, body: dict[str, Any]) -> bytes:
        """Move the largest inline media to URLs (via the uploader) until the payload fits /run."""
        assert self.uploader is not None
        data = _dumps(body)
        for holder, key in sorted(_media_slots(body["input"]["input"]), key=lambda s: -len(s[0][s[1]]["b64"])):
            if len(data) <= RUN_LIMIT_BYTES:
                break
            media = holder[key]
            url = await self.uploader(base64.b64decode(media["b64"]), media.get("mime", "application/octet-stream"))
            holder[key] = {"url": url, "mime": media.get("mime")}
            data = _dumps(body)
        return data

    def bill(self, status: dict[str, Any]) -> Billing | None:
        """The seconds RunPod bills for a job, from its /status timings.

        RunPod bills a worker "from when it starts until it fully stops": start-up, execution and the
        idle timeout (docs.runpod.io/pricing/serverless, read 2026-12-01). A job that ran pays its
        executionTime plus the endpoint's idle timeout; the start-up it may have woken is inside
        delayTime (with any queueing), so delayTime is reported as the bound on it and the money layer
        caps it at the catalog's cold start. A job that never started (no delayTime) bills nothing."""
        exec_ms = status.get("executionTime")
        delay_ms = status.get("delayTime")
        if not isinstance(delay_ms, int | float):
            return None
        run_s = float(exec_ms) / 1000 if isinstance(exec_ms, int | float) else 0.0
        delay_s = float(delay_ms) / 1000
        return Billing(
            billed_seconds=run_s + self.idle_timeout_s,
            estimated=True,
            hardware=self.hardware,
            queue_seconds=delay_s,
            run_seconds=run_s,
            cold_start_seconds=delay_s,
        )

    def attach(self, job_id: str) -> RunPodJob:
        """A job accepted earlier (maybe by a process that died), to poll, cancel and bill by id."""
        return RunPodJob(self, None, job_id, False)

    async def health(self) -> HealthReport:
        started = time.perf_counter()
        try:
            data = await self.call("GET", "health")
        except BrokerError as exc:
            return HealthReport(ok=False, detail=exc.message, latency_s=time.perf_counter() - started)
        latency = time.perf_counter() - started
        jobs: dict[str, Any] = data["jobs"] if isinstance(data.get("jobs"), dict) else {}
        workers: dict[str, Any] = data["workers"] if isinstance(data.get("workers"), dict) else {}
        info: dict[str, Any] = {f"workers_{_snake(k)}": v for k, v in workers.items()}
        info.update({f"jobs_{_snake(k)}": v for k, v in jobs.items()})
        idle, running = int(workers.get("idle", 0) or 0), int(workers.get("running", 0) or 0)
        queued = int(jobs.get("inQueue", 0) or 0)
        detail = f"{idle} idle, {running} running workers; {queued} queued, {jobs.get('inProgress', 0)} in progress"
        # Zero workers is normal (RunPod scales to zero); throttled workers with a queue are not.
        ok = not (queued and not idle and not running and int(workers.get("throttled", 0) or 0))
        return HealthReport(ok=ok, detail=detail, latency_s=latency, info=info)

    async def purge_queue(self) -> int:
        data = await self.call("POST", "purge-queue")
        return int(data.get("removed", 0) or 0)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None and not client.is_closed:
            try:
                await client.aclose()
            except RuntimeError:  # opened on a loop that is gone; nothing left to close
                pass


# -- helpers -------------------------------------------------------------------------------
def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _media_slots(inp: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """(holder, key) of every inline MEDIA object in a job's input."""
    slots: list[tuple[dict[str, Any], str]] = []
    for key in ("audio", "avatar"):
        if isinstance(inp.get(key), dict) and "b64" in inp[key]:
            slots.append((inp, key))
    for seg in inp.get("context") or []:
        if isinstance(seg, dict) and isinstance(seg.get("audio"), dict) and "b64" in seg["audio"]:
            slots.append((seg, "audio"))
    return slots


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _snippet(resp: httpx.Response) -> str:
    text = resp.text.strip().replace("\n", " ")
    return text[:200] or resp.reason_phrase


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in str(name)).lstrip("_")
