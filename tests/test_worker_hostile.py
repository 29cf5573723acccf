"""Hostile input to `broker worker serve`: typed 4xx, never a 500, and memory bounded per request.

Each case was seen to crash the worker (500), eat gigabytes or answer ``ok: true`` with no audio.
The tests assert the typed answer and that the expensive step never ran, not timings.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from broker import wire
from broker.testing.asgi_server import LoopbackServer
from broker.types import RenderRequest, build
from broker.worker import handle
from broker.worker.server import MiB, create_app

pytestmark = pytest.mark.usefixtures("piper_available")

KEY = "hostile-key-5d"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG_TEXT = " ".join(f"Sentence {i} of a chapter that takes the engine a while to read aloud." for i in range(5))


def huge_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A small file whose header declares ``width`` x ``height`` pixels (1.2 GB as RGB at 20000²)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" + b"\0" * (width * 3)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * 50, 9)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def worker() -> Iterator[LoopbackServer]:
    with LoopbackServer(create_app(api_key=KEY, max_body_bytes=1 * MiB, max_waiting=4)) as server:
        deadline = time.monotonic() + 120
        while not httpx.get(f"{server.url}/ready").json()["ready"] and time.monotonic() < deadline:
            time.sleep(0.05)
        yield server


def _post(worker: LoopbackServer, body: bytes | dict[str, Any], path: str = "/run") -> httpx.Response:
    kw: dict[str, Any] = {"json": body} if isinstance(body, dict) else {"content": body}
    return httpx.post(f"{worker.url}{path}", headers={**AUTH, "Content-Type": "application/json"}, timeout=60, **kw)


def _render(**inp: Any) -> dict[str, Any]:
    return {"v": 1, "task": "render", "input": {"text": "Hi there.", **inp}}


@pytest.mark.parametrize(("body", "status", "field"), [
    (b"[" * 1000 + b"]" * 1000, 400, "payload"),
    (b'{"a":' * 1000 + b"1" + b"}" * 1000, 400, "payload"),
    ({"text": "Hello."}, 422, "payload"),
    (_render(mouth_box=["a", 1, 1, 1]), 422, "mouth_box.0"),
    (_render(mouth_box=[1.5, 2, 30, 20]), 422, "mouth_box.0"),
    (_render(fps=2e-6), 422, "fps"),
    (_render(fps=60, text=" ".join(["word"] * 2000)), 422, "fps"),
    (_render(size=[512]), 422, "size"),
    ({"v": 1, "task": "speech", "input": {"text": "?!."}}, 422, "text"),
    ({"v": 1, "task": "speech", "input": {"text": "caf\udce9"}}, 400, "payload"),
    ({"v": 1, "task": "speech", "input": {"text": "a\u0000b"}}, 422, "text"),
    ({"v": 1, "task": "speech", "input": {"text": "Hi", "max_length_ms": 1e-9}}, 422, "max_length_ms"),
    ({"v": 1, "task": "speech", "input": {"text": "Hi", "speaker": [1]}}, 422, "speaker"),
    ({"v": 1, "task": "speech", "input": {"text": {"a": 1}}}, 422, "text"),
    ({"v": 1, "task": "speech", "input": {"text": "Hi", "context": "x"}}, 422, "input.context"),
], ids=lambda v: repr(v)[:40])
def test_hostile_bodies_get_a_typed_4xx(worker: LoopbackServer, body: Any, status: int, field: str) -> None:
    if isinstance(body, dict) and "caf" in str(body):
        body = b'{"v": 1, "task": "speech", "input": {"text": "caf\xe9"}}'  # not UTF-8 on the wire
    response = _post(worker, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field, error


def test_a_bare_request_is_told_the_job_shape(worker: LoopbackServer) -> None:
    error = _post(worker, {"text": "Hello."}).json()["error"]
    assert '"task": "speech"' in error["message"] and '"input": {"text"' in error["message"]


def test_a_huge_image_is_refused_from_its_header_before_decoding() -> None:
    png = huge_png()
    assert len(png) < 1 * MiB
    result = handle(wire.encode_request(build(RenderRequest, text="Hi there.", avatar=png)))
    assert result["ok"] is False and result["error"]["field"] == "avatar"
    assert "20000x20000 pixels, over the limit" in result["error"]["message"]


def test_an_oversized_body_is_413_without_waiting(worker: LoopbackServer) -> None:
    response = _post(worker, b"{}" + b" " * (60 * MiB))
    assert response.status_code == 413 and response.json()["error"]["field"] == "payload"


def test_a_waiting_job_has_not_had_its_body_read(worker: LoopbackServer) -> None:
    """While one job runs, a second that has sent only its headers is already waiting for a slot:
    the body is read once the slot is granted, so 32 waiting jobs do not hold 32 bodies."""
    done = threading.Event()
    results: dict[str, Any] = {}

    def long_job() -> None:
        results["first"] = _post(worker, {"v": 1, "task": "speech", "input": {"text": LONG_TEXT}})
        done.set()

    thread = threading.Thread(target=long_job)
    thread.start()
    deadline = time.monotonic() + 30
    while httpx.get(f"{worker.url}/ready").json()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    body = b'{"v": 1, "task": "speech", "input": {"text": "Second."}}'
    host, port = "127.0.0.1", int(worker.url.rsplit(":", 1)[1])
    with socket.create_connection((host, port)) as sock:
        sock.sendall(f"POST /run HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        # no body sent yet: the server must nevertheless count this job as waiting
        info: dict[str, Any] = {}
        while time.monotonic() < deadline and not done.is_set():
            info = httpx.get(f"{worker.url}/ready").json()
            if info["waiting"] == 1:
                break
            time.sleep(0.01)
        assert info.get("waiting") == 1, info
        sock.sendall(body)
        reply = sock.recv(65536)
        while b"\r\n\r\n" not in reply:
            reply += sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    thread.join(60)
    assert results["first"].status_code == 200
