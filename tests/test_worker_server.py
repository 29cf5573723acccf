"""The self-hosted worker (`broker worker serve`) for real on loopback, and the `http` provider against it.

Every test talks HTTP over real sockets to the FastAPI app under uvicorn (``LoopbackServer``) that
runs the real Piper engine; nothing is patched.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from broker import wire
from broker.errors import (
    AuthenticationFailed,
    BrokerError,
    ConfigurationError,
    InvalidRequest,
    ProviderUnavailable,
)
from broker.media import Audio, Video, frames_for
from broker.providers.base import JobState
from broker.providers.http import HTTPProvider
from broker.routing.manager import CloudGPUManager
from broker.settings import Settings
from broker.testing.asgi_server import LoopbackServer
from broker.types import RenderRequest, Segment, SpeechRequest, build
from broker.worker import handle
from broker.worker.server import MiB, WorkerOptions, WorkerState, create_app, load_presets, status_for

pytestmark = pytest.mark.usefixtures("piper_available")

KEY = "test-key-7f3a9c"
AVATAR = (Path(__file__).resolve().parent.parent / "broker" / "assets" / "avatar.jpg").read_bytes()
LONG_TEXT = " ".join(f"This is sentence number {i} of a long chapter that takes a while to read." for i in range(60))


def _speech(text: str = "Hello from the worker.", **kw: Any) -> dict[str, Any]:
    return wire.encode_request(build(SpeechRequest, text=text, **kw))


def _wait_ready(url: str, timeout: float = 120.0) -> dict[str, Any]:
    """Until the worker has finished starting: ready, or not ready with the reason."""
    deadline = time.monotonic() + timeout
    while True:
        info = dict(httpx.get(f"{url}/ready").json())
        if info["ready"] or "error" in info or time.monotonic() > deadline:
            return info
        time.sleep(0.05)


async def _ready_info(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        return dict((await client.get(f"{url}/ready")).json())


async def _until(url: str, check: Any, timeout: float = 60.0) -> dict[str, Any]:
    """Poll /ready (without blocking the event loop the jobs run on) until ``check(info)``."""
    deadline = time.monotonic() + timeout
    while True:
        info = await _ready_info(url)
        if check(info) or time.monotonic() > deadline:
            return info
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def presets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("avatars")
    (d / "narrator.jpg").write_bytes(AVATAR)
    (d / "notes.txt").write_text("not an avatar: ignored")
    return d


@pytest.fixture(scope="module")
def worker(presets_dir: Path) -> Iterator[LoopbackServer]:
    app = create_app(api_key=KEY, max_body_bytes=1 * MiB, avatars_dir=presets_dir)
    with LoopbackServer(app) as server:
        assert _wait_ready(server.url)["ready"]
        yield server


def _auth(**extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}", **extra}


# -- the HTTP API --------------------------------------------------------------------------------
def test_health_and_ready_need_no_key(worker: LoopbackServer) -> None:
    assert httpx.get(f"{worker.url}/health").json() == {"ok": True}
    ready = httpx.get(f"{worker.url}/ready")
    assert ready.status_code == 200
    info = ready.json()
    assert info["ready"] is True and info["device"] == "cpu"
    assert info["presets"] == ["narrator"], "images load as presets; other files are skipped"


@pytest.mark.parametrize("header", ["bearer", "x-api-key"])
def test_run_speech(worker: LoopbackServer, header: str) -> None:
    headers = _auth() if header == "bearer" else {"X-API-Key": KEY}
    payload = _speech()
    r = httpx.post(f"{worker.url}/run", json=payload, headers=headers, timeout=60)
    assert r.status_code == 200
    result = r.json()
    assert result["ok"] is True and result["id"] == payload["id"]
    audio = wire.decode_result(result)
    assert isinstance(audio, Audio) and audio.rms() > 0.01 and 0.8 < audio.duration_s < 4
    assert result["metrics"]["device"] == "cpu"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"X-API-Key": "nope"},
                                     {"Authorization": KEY}])
def test_missing_or_wrong_key_is_401(worker: LoopbackServer, headers: dict[str, str]) -> None:
    r = httpx.post(f"{worker.url}/run", json=_speech(), headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    err = r.json()["error"]
    assert err["type"] == "AuthenticationFailed"
    assert KEY not in r.text and "nope" not in r.text


def test_oversized_body_is_413(worker: LoopbackServer) -> None:
    big = {"v": 1, "task": "speech", "input": {"text": "a " * (MiB // 2 + 10)}}
    r = httpx.post(f"{worker.url}/run", json=big, headers=_auth())
    assert r.status_code == 413
    assert r.json()["error"]["field"] == "payload" and "1 MiB" in r.json()["error"]["message"]

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is counted while reading
        for _ in range(40):
            yield b" " * 64 * 1024

    r = httpx.post(f"{worker.url}/run", content=chunked(), headers=_auth())
    assert r.status_code == 413


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b"{not json", 400, "payload"),
        (json.dumps({"v": 1, "task": "speech", "input": {"text": "   "}}).encode(), 422, "text"),
        (json.dumps({"v": 1, "task": "speech", "input": {"text": "hi", "speaker": 99}}).encode(), 422, "speaker"),
        (json.dumps({"v": 7, "task": "speech", "input": {"text": "hi"}}).encode(), 422, "v"),
        (json.dumps([1, 2]).encode(), 422, "payload"),
    ],
)
def test_invalid_input_gets_typed_error(worker: LoopbackServer, body: bytes, status: int, field: str) -> None:
    r = httpx.post(f"{worker.url}/run", content=body, headers=_auth(**{"content-type": "application/json"}))
    assert r.status_code == status
    err = r.json()["error"]
    assert err["type"] == "InvalidRequest" and err["field"] == field


def test_stream_chunks_in_order_with_final_flag(worker: LoopbackServer) -> None:
    payload = wire.encode_request(build(SpeechRequest, text="One sentence. A second one. And a third."),
                                  stream=True)
    lines = []
    with httpx.stream("POST", f"{worker.url}/stream", json=payload, headers=_auth(), timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line.strip()]
    assert len(lines) >= 3
    assert [c["chunk"]["index"] for c in lines] == list(range(len(lines)))
    assert [c["chunk"]["final"] for c in lines] == [False] * (len(lines) - 1) + [True]
    pieces = [wire.decode_chunk(c)[2] for c in lines]
    assert sum(p.rms() > 0.01 for p in pieces) >= 3, "one spoken piece per sentence"


def test_stream_of_invalid_job_is_422_not_a_stream(worker: LoopbackServer) -> None:
    r = httpx.post(f"{worker.url}/stream", json=_speech(speaker=42), headers=_auth())
    assert r.status_code == 422 and r.json()["error"]["field"] == "speaker"


def test_render_through_worker_matches_local_outcome(worker: LoopbackServer) -> None:
    """Render: the worker gives what `handle` gives in-process (a video, or the engine's typed error intact)."""
    request = build(RenderRequest, text="Hello there.", avatar_preset="narrator")
    payload = wire.encode_request(request)
    local = handle({**payload, "input": {**payload["input"], "avatar": wire.encode_media(AVATAR, "image/*"),
                                         "avatar_preset": None}})
    r = httpx.post(f"{worker.url}/run", json=payload, headers=_auth(), timeout=120)
    remote = r.json()
    if local["ok"]:
        assert r.status_code == 200
        video = wire.decode_result(remote)
        assert isinstance(video, Video) and video.data[4:8] == b"ftyp"
        assert (video.width, video.height, video.fps) == (local["width"], local["height"], local["fps"])
        # Piper's VITS sampling is random, so the spoken length (and frame count) varies a little.
        assert abs(video.frames - local["frames"]) <= 3 and video.frames == frames_for(video.audio_seconds, video.fps)
    else:
        # The render engine is not finished on this branch: its typed error must arrive unchanged.
        assert r.status_code == status_for(local) >= 400
        assert {k: v for k, v in remote["error"].items()} == local["error"]
        with pytest.raises(BrokerError) as info:
            wire.decode_result(remote)
        assert type(info.value).__name__ == local["error"]["type"]


def test_unknown_preset_is_422_naming_the_presets(worker: LoopbackServer) -> None:
    payload = wire.encode_request(build(RenderRequest, text="Hi.", avatar_preset="ghost"))
    r = httpx.post(f"{worker.url}/run", json=payload, headers=_auth())
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "input.avatar_preset" and "narrator" in r.json()["error"]["message"]


def test_preset_resolution(presets_dir: Path) -> None:
    state = WorkerState(WorkerOptions(avatars_dir=presets_dir))
    state.presets = load_presets(presets_dir)
    payload = wire.encode_request(build(RenderRequest, text="Hi.", avatar_preset="narrator"))
    resolved = state.apply_preset(payload)
    if state.presets.registered:
        assert resolved == payload  # the render engine holds the pre-processed avatar
    else:
        assert resolved["input"]["avatar_preset"] is None
        assert wire.decode_media(resolved["input"]["avatar"], "avatar") == AVATAR
        assert wire.decode_request(resolved).avatar == AVATAR  # type: ignore[union-attr]
    speech = _speech()
    assert state.apply_preset(speech) is speech


def test_bad_preset_dir_keeps_worker_unready(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_text("this is not a picture")
    with LoopbackServer(create_app(avatars_dir=tmp_path)) as server:
        info = _wait_ready(server.url, timeout=30)
        assert info["ready"] is False and "broken.png" in info["error"]
        assert httpx.get(f"{server.url}/ready").status_code == 503
        assert httpx.get(f"{server.url}/health").status_code == 200
        r = httpx.post(f"{server.url}/run", json=_speech())
        assert r.status_code == 503 and r.json()["error"]["type"] == "EngineUnavailable"
    with pytest.raises(ConfigurationError):
        load_presets(tmp_path / "missing")


# -- the http provider --------------------------------------------------------------------------
async def test_http_provider_speech_stream_and_health(worker: LoopbackServer) -> None:
    async with HTTPProvider(worker.url, api_key=KEY, usd_per_hour=3.6) as provider:
        health = await provider.health()
        assert health.ok and health.info["ready"] is True
        job = await provider.submit(build(SpeechRequest, text="Hello over HTTP."))
        audio = await job.result(timeout=60)
        assert isinstance(audio, Audio) and audio.rms() > 0.01
        assert job.state == JobState.SUCCEEDED
        assert job.billing is not None and job.billing.estimated and job.billing.billed_seconds > 0
        assert job.billing.cost_usd == pytest.approx(job.billing.billed_seconds * 0.001)
        chunks = [c async for c in provider.astream_speech("First part. Second part. Third part.")]
        assert len(chunks) >= 3 and chunks[-1].final and [c.index for c in chunks] == list(range(len(chunks)))


async def test_http_provider_maps_errors(worker: LoopbackServer) -> None:
    async with HTTPProvider(worker.url, api_key="wrong-key") as provider:
        with pytest.raises(AuthenticationFailed) as auth:
            await provider.agenerate_speech("hi")
        assert "wrong-key" not in str(auth.value) and auth.value.retryable is False
    async with HTTPProvider(worker.url, api_key=KEY) as provider:
        with pytest.raises(InvalidRequest) as bad:
            await provider.agenerate_speech("hi", speaker=42)
        assert bad.value.field == "speaker"
        # 30 s of noise as context: about 2 MB on the wire, over this worker's 1 MiB limit.
        noise = np.random.default_rng(0).uniform(-0.5, 0.5, 24_000 * 30).astype(np.float32)
        with pytest.raises(ProviderUnavailable) as big:
            await provider.agenerate_speech("hi", context=[Segment(speaker=0, text="noise", audio=noise)])
        assert big.value.status_code == 413 and big.value.retryable is False


async def test_cancel_reaches_the_worker(worker: LoopbackServer) -> None:
    before = await _ready_info(worker.url)
    async with HTTPProvider(worker.url, api_key=KEY) as provider:
        job = await provider.submit(build(SpeechRequest, text=LONG_TEXT))
        await _until(worker.url, lambda i: i["running"] == 1)
        await job.cancel()
        assert job.state == JobState.CANCELLED
    info = await _until(worker.url, lambda i: i["cancelled"] > before["cancelled"])
    assert info["cancelled"] == before["cancelled"] + 1, "the engine was told to stop"
    assert info["running"] == 0


async def test_busy_worker_answers_503_with_retry_after() -> None:
    app = create_app(WorkerOptions(concurrency=1, max_waiting=0))
    with LoopbackServer(app) as server:
        _wait_ready(server.url)
        async with HTTPProvider(server.url) as provider, httpx.AsyncClient() as client:
            long_job = await provider.submit(build(SpeechRequest, text=LONG_TEXT))
            assert (await _until(server.url, lambda i: i["running"] == 1))["running"] == 1
            r = await client.post(f"{server.url}/run", json=_speech())
            assert r.status_code == 503 and r.headers["retry-after"] == "2"
            with pytest.raises(ProviderUnavailable) as busy:
                await provider.agenerate_speech("hi")
            assert busy.value.retry_after == 2.0 and busy.value.retryable
            await long_job.cancel()


def test_manager_fails_over_to_local_and_recovers() -> None:
    """Worker up → http serves; worker down (connection refused) → local serves; worker back → http again."""
    server = LoopbackServer(create_app(api_key=KEY)).start()
    _wait_ready(server.url)
    # One try per provider: a refused connection fails over at once, and no circuit opens on the way.
    one_try = Settings()
    one_try.manager.attempts_per_provider = 1
    manager = CloudGPUManager([HTTPProvider(server.url, api_key=KEY, connect_timeout_s=2), "local"],
                              settings=one_try)
    try:
        manager.generate_speech("Served by the worker.", return_tensor=False)
        assert manager.last_report is not None and manager.last_report.provider == "http"

        server.stop()
        audio = manager.generate_speech("Served locally.", return_tensor=False)
        report = manager.last_report
        assert report is not None and report.provider == "local" and audio.rms() > 0.01
        assert [(a.provider, a.outcome) for a in report.attempts] == [("http", "failed"), ("local", "succeeded")]
        assert report.attempts[0].error_class == "ProviderUnavailable"
        assert "cannot reach http" in (report.attempts[0].message or "")

        server = LoopbackServer(create_app(api_key=KEY), port=server.port).start()
        _wait_ready(server.url)
        manager.generate_speech("Back on the worker.", return_tensor=False)
        assert manager.last_report is not None and manager.last_report.provider == "http"
    finally:
        manager.close()
        server.stop()


async def test_redirect_to_another_origin_drops_credentials(worker: LoopbackServer) -> None:
    """A 307 to another host:port is followed, but our key is not sent there."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, RedirectResponse
    from starlette.routing import Route

    seen: list[dict[str, str]] = []

    async def elsewhere(request: Request) -> JSONResponse:
        seen.append(dict(request.headers))
        return JSONResponse(handle(await request.json()))

    with LoopbackServer(Starlette(routes=[Route("/run", elsewhere, methods=["POST"])])) as other:
        async def bounce(request: Request) -> RedirectResponse:
            return RedirectResponse(f"{other.url}/run", status_code=307)

        with LoopbackServer(Starlette(routes=[Route("/run", bounce, methods=["POST"])])) as front:
            async with HTTPProvider(front.url, api_key=KEY) as provider:
                audio = await provider.agenerate_speech("Redirected.")
    assert isinstance(audio, Audio) and audio.rms() > 0.01
    assert len(seen) == 1 and "authorization" not in seen[0]


def test_settings_and_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError) as info:
        HTTPProvider.from_settings(Settings())
    assert "BROKER_HTTP__URL" in str(info.value)
    monkeypatch.setenv("BROKER_HTTP__URL", "http://user:pw@gpu-box:8000")
    monkeypatch.setenv("BROKER_WORKER_API_KEY", KEY)
    settings = Settings()
    provider = HTTPProvider.from_settings(settings)
    for text in (repr(provider), repr(provider.client), repr(settings), json.dumps(settings.redacted())):
        assert KEY not in text
    assert "pw" not in repr(provider) and "gpu-box:8000" in repr(provider)  # user:password@ is dropped
    provider.close()


def test_worker_dockerfile_copies_what_exists_and_runs_a_real_command() -> None:
    """containers/worker.Dockerfile builds on the shared base; its COPY sources and command must be real."""
    import shlex
    import tomllib

    from tests.conftest import ROOT, run_cli

    text = (ROOT / "containers" / "worker.Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    instructions = [i.strip() for i in "\n".join(lines).replace("\\\n", " ").splitlines() if i.strip()]
    assert "ARG BASE_IMAGE=broker-base" in instructions and "FROM ${BASE_IMAGE}" in instructions
    copies = [shlex.split(i)[1:-1] for i in instructions if i.startswith("COPY ")]
    assert copies, "the image copies this checkout"
    for sources in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY source {source} is missing"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"fastapi", "uvicorn"} <= {d.split(">")[0].split("=")[0] for d in extras["worker"]}

    entry = json.loads(next(i for i in instructions if i.startswith("ENTRYPOINT "))[len("ENTRYPOINT "):])
    cmd = json.loads(next(i for i in instructions if i.startswith("CMD "))[len("CMD "):])
    assert entry[:3] == ["broker", "worker", "serve"]
    proc = run_cli(*entry[1:], *cmd, "--help")  # click rejects unknown options before --help exits
    assert proc.returncode == 0, proc.stderr


def test_cli_worker_serve(tmp_path: Path, presets_dir: Path) -> None:
    """`broker worker serve` as an operator runs it: key from the environment, presets, a real port."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "BROKER_WORKER_API_KEY": KEY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "worker", "serve", "--port", str(port), "--avatars", str(presets_dir),
         "--max-body-mb", "0.5", "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                info = httpx.get(f"{url}/ready").json()
                if info["ready"] or "error" in info:
                    break
            except httpx.TransportError:
                assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "worker did not become ready"
            time.sleep(0.1)
        assert info["ready"] and info["presets"] == ["narrator"]
        assert httpx.post(f"{url}/run", json=_speech()).status_code == 401
        r = httpx.post(f"{url}/run", json=_speech(), headers={"X-API-Key": KEY}, timeout=60)
        assert r.status_code == 200 and r.json()["ok"]
        assert httpx.post(f"{url}/run", content=b"x" * 600_000, headers={"X-API-Key": KEY}).status_code == 413
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    assert KEY not in stderr
