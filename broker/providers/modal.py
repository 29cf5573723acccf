"""The ``modal`` provider: the app in handlers/modal/app.py, reached by the SDK or over HTTPS.

SDK path (default): ``Cls.from_name(app, class)().run_job.spawn(payload)`` returns a FunctionCall;
we poll it with ``get(timeout=0)`` (Python's TimeoutError = still running, Modal's
``OutputExpiredError`` = the result is gone) and ``cancel()`` it when abandoned. The SDK retries an
unreachable server for about a minute, so every call runs under our own deadline (``rpc_timeout_s``).
Modal's SDK does not say whether a call is queued or running: an accepted call is "running".

HTTP path (``modal.url`` set): the app's ASGI endpoint serves the HTTP job API of
`broker worker serve` behind Modal's proxy, so the shared ``HTTPJobClient`` talks to it with a proxy
auth token (``Modal-Key`` / ``Modal-Secret``) and follows the 303 Modal sends after 150 s
(https://modal.com/docs/guide/webhook-timeouts, read 2026-11-23).

Billing: Modal bills each second a container runs. We estimate the job's share as the wall time from
spawn to result (it includes a cold start when one happened; it leaves out the idle
``scaledown_window`` tail, which is shared by every job of a burst), priced by the money layer.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import httpx
from pydantic import SecretStr

from broker import wire
from broker.engines import SPEECH_ENGINES
from broker.errors import (
    AuthenticationFailed,
    BrokerError,
    ConfigurationError,
    JobCancelled,
    JobFailed,
    JobLost,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from broker.media import Audio, AudioChunk
from broker.providers.base import BackgroundJob, Billing, Capabilities, HealthReport, Job, JobState, Provider, Request
from broker.providers.http import HTTPJob, HTTPJobClient, encode_job
from broker.providers.readiness import modal_token_configured as token_configured
from broker.providers.readiness import modal_unmet
from broker.settings import ModalSettings, Settings
from broker.types import DEFAULT_LIMITS, Limits

T = TypeVar("T")

RUN_METHOD = "run_job"
STREAM_METHOD = "stream_job"


class ModalCalls(Protocol):
    """What the provider needs from Modal; ``SDKCalls`` is the real one, tests inject an in-process one."""

    async def spawn(self, method: str, payload: dict[str, Any]) -> str:
        """Start ``method`` on the class; returns the FunctionCall id."""

    async def poll(self, call_id: str) -> dict[str, Any] | None:
        """The call's result, or None while it runs. Raises ``JobLost`` when the output expired."""

    async def cancel(self, call_id: str) -> None: ...

    def stream(self, method: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Run a generator method, yielding what it yields."""

    async def describe(self) -> dict[str, Any]:
        """Look the deployed class up (checks credentials and that the app is deployed)."""


Lookup = Callable[[str, str], ModalCalls]


def translate_modal_error(exc: BaseException, what: str) -> BrokerError:
    """A Modal SDK exception as a broker error (never with credentials: Modal's messages carry none)."""
    from modal import exception as mx

    msg = f"Modal {what}: {type(exc).__name__}: {exc}".rstrip(": ")
    if isinstance(exc, mx.OutputExpiredError):
        return JobLost(f"Modal {what}: the result expired", provider="modal")
    if isinstance(exc, mx.AuthError | mx.PermissionDeniedError):
        return AuthenticationFailed(msg, provider="modal")
    if isinstance(exc, mx.NotFoundError):
        return ProviderUnavailable(f"{msg} (deploy it with `broker deploy modal`)", provider="modal",
                                   retryable=False)
    if isinstance(exc, mx.ResourceExhaustedError):
        return RateLimited(msg, provider="modal")
    if isinstance(exc, mx.FunctionTimeoutError):
        return ProviderTimeout(msg, provider="modal")
    if isinstance(exc, mx.InputCancellation):
        return JobCancelled(msg)
    if isinstance(exc, mx.ConnectionError | mx.ServiceError | mx.InternalError | mx.ClientClosed | OSError):
        return ProviderUnavailable(msg, provider="modal")
    return JobFailed(msg, provider="modal")


class SDKCalls:
    """``ModalCalls`` over the modal SDK's async (``.aio``) interface."""

    def __init__(self, app_name: str, class_name: str, *, token_id: SecretStr | None = None,
                 token_secret: SecretStr | None = None, environment: str | None = None) -> None:
        self.app_name = app_name
        self.class_name = class_name
        self._token = (token_id, token_secret) if token_id and token_secret else None
        self._environment = environment
        self._client: Any = None
        self._obj: Any = None
        self._cls: Any = None
        self._calls: dict[str, Any] = {}

    async def _instance(self) -> Any:
        import modal

        if self._obj is None:
            if self._token is not None:
                token_id, token_secret = self._token
                assert token_id is not None and token_secret is not None
                self._client = await modal.Client.from_credentials.aio(
                    token_id.get_secret_value(), token_secret.get_secret_value()
                )
            self._cls = modal.Cls.from_name(self.app_name, self.class_name, environment_name=self._environment,
                                            client=self._client)
            self._obj = self._cls()
        return self._obj

    async def spawn(self, method: str, payload: dict[str, Any]) -> str:
        try:
            obj = await self._instance()
            call = await getattr(obj, method).spawn.aio(payload)
        except Exception as exc:
            raise translate_modal_error(exc, f"spawn {self.app_name}.{self.class_name}.{method}") from None
        call_id = str(call.object_id)
        self._calls[call_id] = call
        return call_id

    async def poll(self, call_id: str) -> dict[str, Any] | None:
        import modal

        call = self._calls.get(call_id) or modal.FunctionCall.from_id(call_id, client=self._client)
        try:
            result = await call.get.aio(timeout=0)
        except builtins.TimeoutError:
            return None  # Python's TimeoutError: still running (Modal's own timeouts are not subclasses)
        except Exception as exc:
            raise translate_modal_error(exc, f"get {call_id}") from None
        self._calls.pop(call_id, None)
        return result if isinstance(result, dict) else {"ok": False, "error": {"type": "BadOutput",
                                                                                 "message": "not a dict"}}

    async def cancel(self, call_id: str) -> None:
        import modal

        call = self._calls.pop(call_id, None) or modal.FunctionCall.from_id(call_id, client=self._client)
        try:
            await call.cancel.aio()
        except Exception as exc:
            raise translate_modal_error(exc, f"cancel {call_id}") from None

    async def stream(self, method: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        try:
            obj = await self._instance()
            async for item in getattr(obj, method).remote_gen.aio(payload):
                yield item
        except (BrokerError, GeneratorExit, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise translate_modal_error(exc, f"stream {self.app_name}.{self.class_name}.{method}") from None

    async def describe(self) -> dict[str, Any]:
        try:
            await self._instance()
            await self._cls.hydrate.aio()
        except Exception as exc:
            raise translate_modal_error(exc, f"look up {self.app_name}.{self.class_name}") from None
        return {"app": self.app_name, "class": self.class_name, "id": self._cls.object_id}


def modal_token_configured(settings: Settings | None = None, section: ModalSettings | None = None) -> bool:
    """True when the SDK has credentials (see ``readiness.modal_token_configured``)."""
    return token_configured(section or (settings.modal if settings is not None else None))


class ModalJob(Job):
    """A job spawned through the SDK (or the injected ``ModalCalls``)."""

    #: polls in a row that may go unanswered before the job counts as lost with an unreachable Modal
    max_missed_polls = 3

    def __init__(self, provider: ModalProvider, calls: ModalCalls, call_id: str, request: Request | None) -> None:
        super().__init__(provider.name, call_id, request)
        self._provider = provider
        self._calls = calls
        self._started = time.monotonic()
        self._missed = 0
        self._set_state(JobState.RUNNING)

    async def _refresh(self) -> None:
        try:
            result = await self._provider.rpc(self._calls.poll(self.id), "poll")
        except JobLost as exc:
            self._fail(exc, JobState.LOST)
            return
        except ProviderUnavailable as exc:
            # One missed poll is a blip; several in a row and the job is as good as lost to us.
            self._missed += 1
            if self._missed >= self.max_missed_polls:
                self._fail(exc)
            return
        except BrokerError as exc:
            self._fail(exc)
            return
        self._missed = 0
        if result is None:
            return
        self.billing = self._provider.bill(time.monotonic() - self._started, result.get("metrics") or {})
        try:
            self._succeed(wire.decode_result(result, provider=self.provider))
        except BrokerError as exc:
            self._fail(exc)

    async def _cancel(self) -> bool:
        """``FunctionCall.cancel`` terminates the call once Modal accepts it; a refusal or an unreachable
        Modal raises, and ``Job.cancel`` asks again. A call Modal no longer knows cannot run."""
        try:
            await self._provider.rpc(self._calls.cancel(self.id), "cancel")
        except JobLost:
            pass
        if self.billing is None:
            self.billing = self._provider.bill(time.monotonic() - self._started, {})
        return True


class ModalStreamJob(BackgroundJob):
    """A streamed speech job: the generator method's chunks, as they come."""

    def __init__(self, provider: ModalProvider, calls: ModalCalls, payload: dict[str, Any], request: Request) -> None:
        super().__init__(provider.name, str(payload["id"]), request)
        self._provider = provider
        self._calls = calls
        self._payload = payload
        self._started = time.monotonic()
        self._queue: asyncio.Queue[AudioChunk | BaseException | None] = asyncio.Queue()
        self._set_state(JobState.RUNNING)
        self._start()

    async def _run(self) -> None:
        pieces: list[Audio] = []
        items = self._calls.stream(STREAM_METHOD, self._payload)
        try:
            while True:
                try:
                    item = await self._provider.rpc(anext(items), "stream", self._provider.request_timeout_s)
                except StopAsyncIteration:
                    break
                index, final, audio, text = wire.decode_chunk(item, provider=self.provider)
                pieces.append(audio)
                self._queue.put_nowait(AudioChunk(audio, index, final=final, text=text))
            if not pieces:
                raise JobFailed("the stream ended without audio", provider=self.provider)
            self.billing = self._provider.bill(time.monotonic() - self._started, {})
            self._succeed(Audio.concat(pieces))
        except BrokerError as exc:
            self._fail(exc, JobState.LOST if isinstance(exc, JobLost) else JobState.FAILED)
        finally:
            with contextlib.suppress(BaseException):
                await items.aclose()  # type: ignore[attr-defined]
            self._queue.put_nowait(self.error if self.error is not None else None)

    async def stream(self) -> AsyncIterator[AudioChunk]:
        while (item := await self._queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
        if self.error is not None:
            raise self.error


class ModalProvider(Provider):
    name = "modal"
    kind = "modal"

    def __init__(
        self,
        *,
        app_name: str = "broker",
        class_name: str = "BrokerWorker",
        url: str | None = None,
        proxy_key: SecretStr | None = None,
        proxy_secret: SecretStr | None = None,
        token_id: SecretStr | None = None,
        token_secret: SecretStr | None = None,
        environment: str | None = None,
        hardware: str = "A10G",
        queue_timeout_s: float | None = 120.0,
        rpc_timeout_s: float = 15.0,
        request_timeout_s: float = 900.0,
        lookup: Lookup | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        limits: Limits = DEFAULT_LIMITS,
        name: str | None = None,
    ) -> None:
        if name:
            self.name = name
        self.app_name = app_name
        self.class_name = class_name
        self.queue_timeout_s = queue_timeout_s
        self.rpc_timeout_s = rpc_timeout_s
        self.request_timeout_s = request_timeout_s
        self.limits = limits
        self.http: HTTPJobClient | None = None
        self._calls: ModalCalls | None = None
        if url:
            if not (proxy_key and proxy_secret):
                raise ConfigurationError(
                    "modal.url is set but the proxy auth token is missing: set modal.proxy_key and "
                    "modal.proxy_secret (BROKER_MODAL__PROXY_KEY / BROKER_MODAL__PROXY_SECRET), a token "
                    "from https://modal.com/settings/proxy-auth-tokens"
                )
            self.http = HTTPJobClient(url, provider=self.name, transport=transport,
                                      auth_headers={"Modal-Key": proxy_key, "Modal-Secret": proxy_secret},
                                      request_timeout_s=request_timeout_s)
        else:
            self._lookup: Lookup = lookup or (lambda app, cls: SDKCalls(
                app, cls, token_id=token_id, token_secret=token_secret, environment=environment))
        # A remote image's engines cannot be seen from here: the built-ins unless its endpoint says
        # (`engines = [...]`); broker_worker's own default is what *this* process has.
        self.capabilities = Capabilities.broker_worker(hardware, engines=frozenset(SPEECH_ENGINES))

    def __repr__(self) -> str:
        how = "https" if self.http is not None else "sdk"
        return f"<ModalProvider {self.app_name}.{self.class_name} via {how}>"

    @classmethod
    def from_settings(cls, settings: Settings, *, endpoint: str | None = None, config: ModalSettings | None = None,
                      **overrides: Any) -> ModalProvider:
        """HTTP path when ``url`` and a proxy auth token are set, else the SDK path.

        ``endpoint``/``config``: a named endpoint's table (default: the [modal] section). When routing
        builds it (``endpoint`` given), the app must be named: a Modal token alone, made for other
        projects, does not mean broker's app is deployed there.
        """
        m = config or settings.modal
        name = endpoint or cls.name
        unmet = modal_unmet(m, name, overrides, endpoint is not None)
        if unmet is not None:
            raise unmet
        url = overrides.pop("url", m.url)
        proxy_key = overrides.pop("proxy_key", m.proxy_key)
        proxy_secret = overrides.pop("proxy_secret", m.proxy_secret)
        use_http = bool(url and proxy_key and proxy_secret)
        kwargs: dict[str, Any] = {
            "app_name": m.app_name,
            "class_name": m.class_name,
            "url": url if use_http else None,
            "proxy_key": proxy_key,
            "proxy_secret": proxy_secret,
            "token_id": m.token_id,
            "token_secret": m.token_secret,
            "environment": m.environment,
            "hardware": m.hardware,
            "queue_timeout_s": m.queue_timeout_s,
            "rpc_timeout_s": m.rpc_timeout_s,
            "request_timeout_s": m.request_timeout_s,
            "limits": settings.limits,
            "name": name,
        }
        kwargs.update(overrides)
        provider = cls(**kwargs)
        # One job per container at a time, up to max_containers (the app's scaling limit).
        provider.max_concurrency = m.max_concurrency or m.max_containers
        return provider

    def calls(self) -> ModalCalls:
        if self._calls is None:
            self._calls = self._lookup(self.app_name, self.class_name)
        return self._calls

    async def rpc(self, call: Awaitable[T], what: str, timeout: float | None = None) -> T:
        """One Modal call under our deadline: an unreachable Modal is 'unavailable' in seconds, not a minute."""
        limit = timeout or self.rpc_timeout_s
        try:
            return await asyncio.wait_for(call, limit)
        except builtins.TimeoutError:
            raise ProviderUnavailable(f"Modal did not answer {what} within {limit:g} s", provider=self.name) from None

    def bill(self, wall_seconds: float, metrics: dict[str, Any]) -> Billing:
        """Seconds the container ran for this job (the money layer prices them)."""
        hardware = self.capabilities.hardware
        run_s = metrics.get("run_s")
        run = float(run_s) if isinstance(run_s, int | float) else None
        billed = max(wall_seconds, run or 0.0)
        return Billing(
            billed_seconds=billed,
            estimated=True,
            hardware=hardware,
            run_seconds=run,
            queue_seconds=None if run is None else max(0.0, wall_seconds - run),
        )

    async def submit(self, request: Request, *, stream: bool = False) -> Job:
        payload, streaming = encode_job(request, stream=stream, limits=self.limits)
        if self.http is not None:
            return HTTPJob(self.name, self.http, request, payload, stream=streaming, bill=self.bill)
        calls = self.calls()
        if streaming:
            return ModalStreamJob(self, calls, payload, request)
        call_id = await self.rpc(calls.spawn(RUN_METHOD, payload), "spawn")
        return ModalJob(self, calls, call_id, request)

    def attach(self, job_id: str) -> Job | None:
        """A call spawned earlier (maybe by a process that died), to poll or cancel by id (SDK path only:
        an HTTP request ends with the connection that carried it)."""
        if self.http is not None:
            return None
        return ModalJob(self, self.calls(), job_id, None)

    async def health(self) -> HealthReport:
        started = time.perf_counter()
        try:
            if self.http is not None:
                ok, info = await self.http.ready()
                detail = "endpoint ready" if ok else "endpoint not ready"
            else:
                info = await self.rpc(self.calls().describe(), "lookup")
                ok, detail = True, "app deployed"
        except (ProviderError, BrokerError) as exc:
            return HealthReport(ok=False, detail=exc.message, latency_s=time.perf_counter() - started)
        return HealthReport(ok=ok, detail=detail, latency_s=time.perf_counter() - started, info=info)

    async def aclose(self) -> None:
        if self.http is not None:
            await self.http.aclose()
