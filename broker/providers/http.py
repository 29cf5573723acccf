"""The ``http`` provider: a self-hosted `broker worker serve`, and the HTTP job API it speaks.

``HTTPJobClient`` and ``HTTPJob`` are shared with the Modal adapter, whose ASGI endpoint serves the
same API behind Modal's proxy: only the credential headers and the price row differ. A job is one
long request (``POST /run``, or ``POST /stream`` for NDJSON chunks); cancelling the job closes the
connection, which the worker takes as "stop". Redirects are followed by hand: Modal answers a request
that runs past 150 s with ``303 See Other`` to a result URL that must be fetched with GET, and
credentials are only sent again to the same origin.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import SecretStr

from broker import wire
from broker.engines import SPEECH_ENGINES
from broker.errors import (
    AuthenticationFailed,
    BrokerError,
    ConfigurationError,
    InvalidRequest,
    JobFailed,
    JobLost,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    error_from_dict,
)
from broker.media import Audio, AudioChunk
from broker.providers.base import BackgroundJob, Billing, Capabilities, HealthReport, Job, JobState, Provider, Request
from broker.providers.readiness import http_unmet
from broker.settings import HTTPWorkerSettings, Settings
from broker.types import DEFAULT_LIMITS, Limits, SpeechRequest

_REDIRECTS = (301, 302, 303, 307, 308)
#: Modal returns a 303 every 150 s while a request runs; 40 hops is well over an hour
DEFAULT_MAX_REDIRECTS = 40

BillFn = Callable[[float, dict[str, Any]], Billing]


def safe_url(url: str | httpx.URL) -> str:
    """The URL without user:password@ and query string, fit for messages and logs."""
    parts = urlsplit(str(url))
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare from these servers; fall back to our own backoff


def error_for_response(response: httpx.Response, body: bytes, provider: str) -> BrokerError:
    """Map a non-2xx answer to the error tree, keeping the worker's own typed error when it sent one."""
    status = response.status_code
    typed: BrokerError | None = None
    detail = ""
    try:
        payload = json.loads(body) if body else None
    except ValueError:
        payload = None
    if isinstance(payload, dict) and payload.get("ok") is False and isinstance(payload.get("error"), dict):
        typed = error_from_dict(payload["error"], provider=provider)
        detail = typed.message
    else:
        detail = body[:200].decode("utf-8", "replace").strip()
    suffix = f": {detail}" if detail else ""
    where = safe_url(response.request.url)
    retry_after = _retry_after(response)
    if status in (401, 403):
        return AuthenticationFailed(f"{provider} rejected the credentials (HTTP {status}){suffix}",
                                    provider=provider, status_code=status)
    if status == 413:
        # Too big for this worker, not invalid: another provider (or local) may take it.
        return ProviderUnavailable(f"request too large for {provider} (HTTP 413){suffix}", provider=provider,
                                   retryable=False, status_code=status)
    if status == 429:
        return RateLimited(f"{provider} is rate limiting (HTTP 429){suffix}", provider=provider,
                           retry_after=retry_after, status_code=status)
    if typed is not None:
        if isinstance(typed, ProviderError):
            typed.status_code = status
            typed.retry_after = retry_after
        return typed
    if status in (400, 422):
        # The worker refused the request as such (not a broker worker's typed error, but the same meaning).
        return InvalidRequest("input", f"{provider} refused the job (HTTP {status}){suffix}")
    if status == 404:
        return ProviderUnavailable(f"{where} not found (HTTP 404): is the worker served at this URL?",
                                   provider=provider, retryable=False, status_code=status)
    if status == 408:
        return ProviderTimeout(f"{provider} timed out the request (HTTP 408){suffix}", provider=provider,
                               status_code=status)
    if status >= 500:
        return ProviderUnavailable(f"{provider} answered HTTP {status}{suffix}", provider=provider,
                                   retry_after=retry_after, status_code=status)
    return JobFailed(f"{provider} answered HTTP {status}{suffix}", provider=provider, status_code=status)


class HTTPJobClient:
    """Client of the worker's HTTP job API (``/ready``, ``/run``, ``/stream``)."""

    def __init__(
        self,
        base_url: str,
        *,
        provider: str,
        auth_headers: Mapping[str, SecretStr] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        connect_timeout_s: float = 5.0,
        request_timeout_s: float = 900.0,
        max_redirects: int = DEFAULT_MAX_REDIRECTS,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigurationError(f"{provider}: url must start with http:// or https://, got {safe_url(base_url)!r}")
        self.provider = provider
        self.base_url = httpx.URL(base_url.rstrip("/") + "/")
        self._auth = dict(auth_headers or {})
        self.max_redirects = max_redirects
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(request_timeout_s, connect=connect_timeout_s),
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return f"<HTTPJobClient {self.provider} {safe_url(self.base_url)}>"

    def url(self, path: str) -> httpx.URL:
        return self.base_url.join(path.lstrip("/"))

    def _headers(self, url: httpx.URL) -> dict[str, str]:
        if not _same_origin(url, self.base_url):
            return {}  # a redirect elsewhere never gets our credentials
        return {name: secret.get_secret_value() for name, secret in self._auth.items()}

    async def _send(self, method: str, url: httpx.URL, content: bytes | None) -> httpx.Response:
        """One request, body unread; transport failures become provider errors."""
        headers = self._headers(url)
        if content is not None:
            headers["content-type"] = "application/json"
        request = self._client.build_request(method, url, content=content, headers=headers)
        try:
            return await self._client.send(request, stream=True)
        except httpx.ConnectError as exc:
            raise ProviderUnavailable(f"cannot reach {self.provider} at {safe_url(url)}: {_reason(exc)}",
                                      provider=self.provider) from None
        except httpx.TimeoutException as exc:
            raise ProviderTimeout(f"{self.provider} did not answer in time ({type(exc).__name__})",
                                  provider=self.provider) from None
        except httpx.TransportError as exc:
            raise ProviderUnavailable(f"{self.provider} connection failed: {_reason(exc)}",
                                      provider=self.provider) from None

    async def _open(self, method: str, url: httpx.URL, payload: Any | None) -> httpx.Response:
        """Send and follow redirects; returns a 2xx response with its body still unread."""
        hops = 0
        content = json.dumps(payload).encode() if payload is not None else None
        while True:
            response = await self._send(method, url, content)
            if response.status_code in _REDIRECTS and "location" in response.headers:
                await response.aclose()
                hops += 1
                if hops > self.max_redirects:
                    raise ProviderTimeout(f"{self.provider} still redirecting after {hops - 1} hops",
                                          provider=self.provider)
                url = response.url.join(response.headers["location"])
                if response.status_code in (301, 302, 303):
                    # 303 (Modal's result URL) must be fetched with GET; 301/302 as browsers do.
                    method, content = "GET", None
                continue
            if response.is_success:
                return response
            body = await _read_bounded(response)
            raise error_for_response(response, body, self.provider)

    async def run(self, payload: dict[str, Any]) -> dict[str, Any]:
        """POST /run and return the result payload; a non-2xx answer raises its typed error."""
        response = await self._open("POST", self.url("run"), payload)
        try:
            body = await response.aread()
        except httpx.HTTPError as exc:
            raise JobLost(f"{self.provider} dropped the connection before the result: {_reason(exc)}",
                          provider=self.provider) from None
        finally:
            await response.aclose()
        try:
            result = json.loads(body)
        except ValueError:
            raise error_from_dict({"type": "BadOutput", "message": "result is not JSON"},
                                  provider=self.provider) from None
        if not isinstance(result, dict):
            raise error_from_dict({"type": "BadOutput", "message": "result is not a JSON object"},
                                  provider=self.provider)
        return result

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """POST /stream and yield each chunk payload as it arrives."""
        response = await self._open("POST", self.url("stream"), payload)
        try:
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except ValueError:
                    raise error_from_dict({"type": "BadOutput", "message": "stream line is not JSON"},
                                          provider=self.provider) from None
                yield item
        except httpx.HTTPError as exc:
            raise JobLost(f"{self.provider} dropped the stream: {_reason(exc)}", provider=self.provider) from None
        finally:
            await response.aclose()

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        """GET /ready: (ready, the worker's report). 503 is an answer here (still loading), not an error."""
        url = self.url("ready")
        response = await self._send("GET", url, None)
        body = await _read_bounded(response)
        if response.status_code not in (200, 503):
            raise error_for_response(response, body, self.provider)
        try:
            info = json.loads(body) if body else {}
        except ValueError:
            info = {}
        if not isinstance(info, dict):
            info = {}
        return response.status_code == 200 and bool(info.get("ready", True)), info

    async def aclose(self) -> None:
        await self._client.aclose()


async def _read_bounded(response: httpx.Response, limit: int = 64 * 1024) -> bytes:
    data = bytearray()
    try:
        async for part in response.aiter_bytes():
            data += part
            if len(data) >= limit:
                break
    except httpx.HTTPError:
        pass
    finally:
        await response.aclose()
    return bytes(data[:limit])


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


class JobClient(Protocol):
    """What ``HTTPJob`` needs of a client: one worker (``HTTPJobClient``) or a pool of them (``PoolClient``)."""

    async def run(self, payload: dict[str, Any]) -> dict[str, Any]: ...

    def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...


class HTTPJob(BackgroundJob):
    """One job on an HTTP worker: a background request, or a stream of chunks fed to ``stream()``."""

    def __init__(self, provider: str, client: JobClient, request: Request, payload: dict[str, Any],
                 *, stream: bool, bill: BillFn) -> None:
        super().__init__(provider, str(payload["id"]), request)
        self._client = client
        self._payload = payload
        self._bill = bill
        self._chunks: asyncio.Queue[AudioChunk | BaseException | None] | None = asyncio.Queue() if stream else None
        self._started = time.monotonic()
        self._set_state(JobState.RUNNING)  # the worker takes the job as the request arrives
        self._start()

    async def _run(self) -> None:
        try:
            if self._chunks is None:
                result = await self._client.run(self._payload)
                out = wire.decode_result(result, provider=self.provider)
                self._charge(result.get("metrics") or {})
                self._succeed(out)
            else:
                self._succeed(await self._run_stream(self._chunks))
        except asyncio.CancelledError:
            raise
        except BrokerError as exc:
            self._charge({})
            self._fail(exc, JobState.LOST if isinstance(exc, JobLost) else JobState.FAILED)
        except Exception as exc:  # a bug here must not leave the job hanging
            self._fail(JobFailed(f"{type(exc).__name__}: {exc}", provider=self.provider))
        finally:
            if self._chunks is not None:
                self._chunks.put_nowait(self.error if self.error is not None and not self.output else None)

    async def _run_stream(self, queue: asyncio.Queue[AudioChunk | BaseException | None]) -> Audio:
        pieces: list[Audio] = []
        async for item in self._client.stream(self._payload):
            index, final, audio, text = wire.decode_chunk(item, provider=self.provider)
            pieces.append(audio)
            queue.put_nowait(AudioChunk(audio, index, final=final, text=text))
        self._charge({})
        if not pieces:
            raise JobFailed("the stream ended without audio", provider=self.provider)
        return Audio.concat(pieces)

    def _charge(self, metrics: dict[str, Any]) -> None:
        self.billing = self._bill(time.monotonic() - self._started, metrics)

    async def _cancel(self) -> bool:
        # Closing the connection is the worker's "stop": confirmed once the request task has unwound.
        await super()._cancel()
        if self.billing is None:
            self._charge({})
        return True

    async def stream(self) -> AsyncIterator[AudioChunk]:
        if self._chunks is None:
            async for chunk in super().stream():
                yield chunk
            return
        while (item := await self._chunks.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
        if self.error is not None:
            raise self.error


def encode_job(request: Request, *, stream: bool, limits: Limits) -> tuple[dict[str, Any], bool]:
    """Check limits and build the wire payload; only speech streams."""
    request.check_limits(limits)
    streaming = stream and isinstance(request, SpeechRequest)
    return wire.encode_request(request, stream=streaming), streaming


class HTTPProvider(Provider):
    """A `broker worker serve` you run yourself (Kubernetes, ECS, a box under the desk), or a pool of them.

    ``urls`` (several workers) makes a pool: each job goes to the worker with the shortest queue and
    fails over to the others before the manager sees an error (``broker.providers.http_pool``).
    """

    name = "http"
    kind = "http"

    def __init__(
        self,
        url: str | None = None,
        *,
        urls: Sequence[str] = (),
        api_key: str | SecretStr | None = None,
        hardware: str = "cpu",
        usd_per_hour: float | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        connect_timeout_s: float = 5.0,
        request_timeout_s: float = 900.0,
        limits: Limits = DEFAULT_LIMITS,
        name: str | None = None,
    ) -> None:
        from broker.providers.http_pool import PoolClient, WorkerPool

        if name:
            self.name = name
        key = SecretStr(api_key) if isinstance(api_key, str) else api_key
        addresses = list(dict.fromkeys([*([url] if url else []), *urls]))
        if not addresses:
            raise ConfigurationError(f"{self.name}: give the worker's url (or urls for a pool)")
        clients = [HTTPJobClient(
            address,
            provider=self.name,
            auth_headers={"Authorization": SecretStr(f"Bearer {key.get_secret_value()}")} if key else None,
            transport=transport,
            connect_timeout_s=connect_timeout_s,
            request_timeout_s=request_timeout_s,
        ) for address in addresses]
        #: the first worker (the only one without a pool)
        self.client = clients[0]
        self.pool = PoolClient(WorkerPool(clients), self.name)
        self.usd_per_hour = usd_per_hour
        self.limits = limits
        # A remote image's engines cannot be seen from here: the built-ins unless its endpoint says
        # (`engines = [...]`); broker_worker's own default is what *this* process has.
        self.capabilities = Capabilities.broker_worker(hardware, engines=frozenset(SPEECH_ENGINES))

    def __repr__(self) -> str:
        return f"<HTTPProvider {', '.join(m.url for m in self.pool.pool.members)}>"

    @classmethod
    def from_settings(cls, settings: Settings, *, endpoint: str | None = None,
                      config: HTTPWorkerSettings | None = None, **overrides: Any) -> HTTPProvider:
        """The endpoint ``endpoint`` (``config``: its [endpoints.NAME] table; default: the [http] section)."""
        cfg = config or settings.http
        name = endpoint or cls.name
        unmet = http_unmet(cfg, name, overrides)
        if unmet is not None:
            raise unmet
        url = overrides.pop("url", cfg.url)
        urls = list(overrides.pop("urls", cfg.urls))
        kwargs: dict[str, Any] = {
            "urls": urls,
            "api_key": cfg.api_key,
            "hardware": cfg.hardware,
            "usd_per_hour": cfg.usd_per_hour,
            "connect_timeout_s": cfg.connect_timeout_s,
            "request_timeout_s": cfg.request_timeout_s,
            "limits": settings.limits,
            "name": name,
        }
        kwargs.update(overrides)
        provider = cls(url or None, **kwargs)
        if cfg.max_concurrency is not None:
            provider.max_concurrency = cfg.max_concurrency
        return provider

    def bill(self, wall_seconds: float, metrics: dict[str, Any]) -> Billing:
        """Your own machine: the hourly rate you gave states the cost; else the money layer prices the seconds."""
        hardware = self.capabilities.hardware
        cost = wall_seconds * self.usd_per_hour / 3600.0 if self.usd_per_hour is not None else None
        run_s = metrics.get("run_s")
        return Billing(
            billed_seconds=wall_seconds,
            cost_usd=cost,
            estimated=True,
            hardware=hardware,
            run_seconds=float(run_s) if isinstance(run_s, int | float) else None,
        )

    async def submit(self, request: Request, *, stream: bool = False) -> Job:
        payload, streaming = encode_job(request, stream=stream, limits=self.limits)
        return HTTPJob(self.name, self.pool, request, payload, stream=streaming, bill=self.bill)

    async def health(self) -> HealthReport:
        started = time.perf_counter()
        try:
            ok, info = await self.pool.ready()
        except BrokerError as exc:
            return HealthReport(ok=False, detail=exc.message, latency_s=time.perf_counter() - started)
        detail = "worker ready" if ok else f"worker not ready: {info.get('error') or info.get('detail') or ''}"
        return HealthReport(ok=ok, detail=detail.strip(), latency_s=time.perf_counter() - started, info=info)

    async def aclose(self) -> None:
        await self.pool.aclose()
