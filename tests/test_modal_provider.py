"""The modal provider, both paths.

SDK path: Modal has no local server, so these tests inject ``lookup=`` with ``InProcessModal``
(tests/modal_helpers.py): each spawned call is a real in-process run of the app's ``BrokerWorker``
method via ``.local()``. What only the real SDK can show — that an unreachable Modal fails within
our deadline — runs the real ``SDKCalls`` against a closed loopback port.

HTTP path: the app's real ASGI app (``BrokerWorker().web.local()``) behind ``ModalWebProxy``, a
loopback stand-in for Modal's proxy (proxy-auth tokens, 303 to a result URL for long requests),
under uvicorn.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from broker.errors import (
    AuthenticationFailed,
    ConfigurationError,
    InvalidRequest,
    JobFailed,
    JobLost,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from broker.media import Audio
from broker.providers.base import JobState
from broker.providers.modal import ModalProvider, SDKCalls, translate_modal_error
from broker.routing.manager import CloudGPUManager
from broker.settings import Settings
from broker.testing.asgi_server import LoopbackServer
from broker.testing.modal_web import ModalWebProxy
from broker.types import SpeechRequest, build
from tests.modal_helpers import InProcessModal, load_modal_app

pytestmark = pytest.mark.usefixtures("piper_available")

PROXY_KEY, PROXY_SECRET = "wk-test-1234", "ws-test-secret-5678"
TEXT = "Hello from Modal, through the provider."


@pytest.fixture(scope="module")
def worker_cls() -> Any:
    return load_modal_app().BrokerWorker


@pytest.fixture(scope="module")
def worker_obj(worker_cls: Any) -> Any:
    return worker_cls()  # like a warm container: entered once, then reused


@pytest.fixture
def modal(worker_obj: Any) -> InProcessModal:
    return InProcessModal(worker_obj)


def _sdk_provider(backend: InProcessModal, **kw: Any) -> ModalProvider:
    return ModalProvider(lookup=lambda app, cls: backend, **kw)


# -- SDK path ----------------------------------------------------------------------------------------
async def test_sdk_path_runs_a_job(modal: InProcessModal) -> None:
    provider = _sdk_provider(modal)
    job = await provider.submit(build(SpeechRequest, text=TEXT))
    assert job.id.startswith("fc-") and job.state == JobState.RUNNING
    audio = await job.result(timeout=120)
    assert isinstance(audio, Audio) and audio.rms() > 0.01
    assert modal.spawned[0][0] == "run_job" and modal.spawned[0][1]["task"] == "speech"
    assert job.billing is not None and job.billing.estimated and job.billing.hardware == "A10G"
    assert job.billing.billed_seconds >= (job.billing.run_seconds or 0) > 0


async def test_sdk_path_streams(modal: InProcessModal) -> None:
    provider = _sdk_provider(modal)
    chunks = [c async for c in provider.astream_speech("One. Two. Three.")]
    assert modal.spawned[0][0] == "stream_job"
    assert [c.index for c in chunks] == list(range(len(chunks))) and chunks[-1].final


async def test_sdk_path_errors_lost_and_cancel(modal: InProcessModal) -> None:
    provider = _sdk_provider(modal)
    with pytest.raises(InvalidRequest) as bad:
        await provider.agenerate_speech("hi", speaker=12)
    assert bad.value.field == "speaker", "the worker's typed error comes back as itself"

    job = await provider.submit(build(SpeechRequest, text=TEXT))
    modal.expired.add(job.id)
    with pytest.raises(JobLost):
        await job.result(timeout=30)
    assert job.state == JobState.LOST

    job = await provider.submit(build(SpeechRequest, text=TEXT))
    await job.cancel()
    await job.cancel()
    assert job.state == JobState.CANCELLED and modal.cancelled == [job.id]


async def test_manager_abandoning_a_slow_job_cancels_it_on_modal(modal: InProcessModal) -> None:
    provider = _sdk_provider(modal)
    with pytest.raises(ProviderTimeout):
        await provider.arun(build(SpeechRequest, text=TEXT), timeout=0.01)
    assert len(modal.cancelled) == 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_modal_fails_within_our_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real SDK retries an unreachable server for about a minute; our deadline cuts that short."""
    monkeypatch.setenv("MODAL_SERVER_URL", f"http://127.0.0.1:{_closed_port()}")
    provider = ModalProvider(token_id=SecretStr("ak-test"), token_secret=SecretStr("as-test"), rpc_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(ProviderUnavailable) as info:
        await provider.submit(build(SpeechRequest, text="hi"))
    assert time.monotonic() - started < 10
    assert "within 1 s" in info.value.message and "as-test" not in info.value.message
    health = await provider.health()
    assert not health.ok and "did not answer" in health.detail


def test_manager_fails_over_from_unreachable_modal_to_local(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODAL_SERVER_URL", f"http://127.0.0.1:{_closed_port()}")
    modal = ModalProvider(token_id=SecretStr("ak-test"), token_secret=SecretStr("as-test"), rpc_timeout_s=1.0)
    one_try = Settings()
    one_try.manager.attempts_per_provider = 1  # no same-provider retries: one failed attempt, then local
    manager = CloudGPUManager([modal, "local"], settings=one_try)
    audio = manager.generate_speech("Modal is down, so this runs here.", return_tensor=False)
    report = manager.last_report
    assert report is not None and report.provider == "local" and audio.rms() > 0.01
    assert [(a.provider, a.outcome, a.error_class) for a in report.attempts] == [
        ("modal", "failed", "ProviderUnavailable"), ("local", "succeeded", None)]


def test_modal_errors_map_onto_the_error_tree() -> None:
    from modal import exception as mx

    cases = [
        (mx.OutputExpiredError(), JobLost),
        (mx.AuthError("bad token"), AuthenticationFailed),
        (mx.NotFoundError("App 'broker' not found"), ProviderUnavailable),
        (mx.ResourceExhaustedError("slow down"), RateLimited),
        (mx.FunctionTimeoutError("too long"), ProviderTimeout),
        (mx.ConnectionError("no route"), ProviderUnavailable),
        (mx.RemoteError("boom"), JobFailed),
    ]
    for exc, expected in cases:
        err = translate_modal_error(exc, "spawn")
        assert type(err) is expected, (exc, err)
    assert translate_modal_error(mx.NotFoundError("x"), "spawn").retryable is False  # type: ignore[attr-defined]
    assert "broker deploy modal" in translate_modal_error(mx.NotFoundError("x"), "spawn").message
    assert isinstance(SDKCalls("broker", "BrokerWorker"), SDKCalls)  # building it touches no network


def test_from_settings_picks_the_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "MODAL_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(tmp_path / ".modal.toml"))
    with pytest.raises(ConfigurationError) as info:
        ModalProvider.from_settings(Settings())
    assert "modal token new" in info.value.message

    (tmp_path / ".modal.toml").write_text('[default]\ntoken_id = "ak-file"\ntoken_secret = "as-file"\nactive = true\n')
    sdk = ModalProvider.from_settings(Settings())
    assert sdk.http is None and "via sdk" in repr(sdk)

    monkeypatch.setenv("BROKER_MODAL__URL", "https://ws--broker-brokerworker-web.modal.run")
    assert ModalProvider.from_settings(Settings()).http is None, "a URL without a proxy token keeps the SDK path"
    monkeypatch.setenv("BROKER_MODAL__PROXY_KEY", PROXY_KEY)
    monkeypatch.setenv("BROKER_MODAL__PROXY_SECRET", PROXY_SECRET)
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-env-id")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-env-secret")
    settings = Settings()
    web = ModalProvider.from_settings(settings)
    assert web.http is not None and "via https" in repr(web)
    for text in (repr(web), repr(web.http), repr(settings), json.dumps(settings.redacted())):
        for secret in (PROXY_SECRET, PROXY_KEY, "as-env-secret"):
            assert secret not in text
    with pytest.raises(ConfigurationError):
        ModalProvider(url="https://x.modal.run")


# -- HTTP path (the ASGI endpoint behind a loopback Modal proxy) ----------------------------------------
@pytest.fixture(scope="module")
def proxy(worker_obj: Any) -> Iterator[tuple[LoopbackServer, ModalWebProxy]]:
    front = ModalWebProxy(worker_obj.web.local(), token_id=PROXY_KEY, token_secret=PROXY_SECRET)
    with LoopbackServer(front) as server:
        yield server, front


def _http_provider(url: str, key: str = PROXY_KEY, secret: str = PROXY_SECRET) -> ModalProvider:
    return ModalProvider(url=url, proxy_key=SecretStr(key), proxy_secret=SecretStr(secret))


async def test_http_path_runs_and_streams(proxy: tuple[LoopbackServer, ModalWebProxy]) -> None:
    server, _ = proxy
    async with _http_provider(server.url) as provider:
        assert (await provider.health()).ok
        job = await provider.submit(build(SpeechRequest, text=TEXT))
        audio = await job.result(timeout=120)
        assert isinstance(audio, Audio) and audio.rms() > 0.01
        assert job.billing is not None and job.billing.hardware == "A10G" and job.billing.billed_seconds > 0
        chunks = [c async for c in provider.astream_speech("One. Two. Three.")]
        assert len(chunks) >= 3 and chunks[-1].final


async def test_http_path_without_the_right_token_is_401(proxy: tuple[LoopbackServer, ModalWebProxy]) -> None:
    server, _ = proxy
    async with _http_provider(server.url, secret="ws-wrong") as provider:
        with pytest.raises(AuthenticationFailed) as info:
            await provider.agenerate_speech("hi")
    assert "missing credentials for proxy authorization" in info.value.message
    assert "ws-wrong" not in info.value.message


async def test_http_path_follows_the_303_to_the_result_url(proxy: tuple[LoopbackServer, ModalWebProxy]) -> None:
    server, front = proxy
    front.redirect_after_s = 0.05  # Modal: 150 s
    before = front.redirects
    try:
        async with _http_provider(server.url) as provider:
            audio = await provider.agenerate_speech(" ".join([TEXT] * 3))
    finally:
        front.redirect_after_s = 150.0
    assert isinstance(audio, Audio) and audio.rms() > 0.01
    assert front.redirects > before, "the request outlived the window and came back through the result URL"


async def test_result_url_rejects_post(proxy: tuple[LoopbackServer, ModalWebProxy]) -> None:
    server, _ = proxy
    headers = {"Modal-Key": PROXY_KEY, "Modal-Secret": PROXY_SECRET}
    async with httpx.AsyncClient() as client:
        r = await client.post(f"{server.url}/run?__modal_function_call_id=fc-x", json={}, headers=headers)
    assert r.status_code == 400 and "bad redirect method" in r.text


async def test_http_path_down_is_unavailable() -> None:
    async with _http_provider(f"http://127.0.0.1:{_closed_port()}") as provider:
        with pytest.raises(ProviderUnavailable):
            await provider.agenerate_speech("hi")
        assert not (await provider.health()).ok
    await asyncio.sleep(0)


def test_chain_modal_down_worker_up(monkeypatch: pytest.MonkeyPatch, worker_obj: Any) -> None:
    """Modal unreachable → the self-hosted worker serves; the local provider is never needed."""
    from broker.providers.http import HTTPProvider

    monkeypatch.setenv("MODAL_SERVER_URL", f"http://127.0.0.1:{_closed_port()}")
    modal = ModalProvider(token_id=SecretStr("ak-test"), token_secret=SecretStr("as-test"), rpc_timeout_s=1.0)
    with LoopbackServer(worker_obj.web.local()) as worker:
        one_try = Settings()
        one_try.manager.attempts_per_provider = 1
        # Keep the configured order (the free self-hosted worker would otherwise be ranked first).
        manager = CloudGPUManager([modal, HTTPProvider(worker.url), "local"], settings=one_try,
                                  policy=lambda candidates, ctx: list(candidates))
        try:
            manager.generate_speech("The worker takes over.", return_tensor=False)
        finally:
            manager.close()
    report = manager.last_report
    assert report is not None and report.provider == "http"
    assert [(a.provider, a.outcome) for a in report.attempts] == [("modal", "failed"), ("http", "succeeded")]
