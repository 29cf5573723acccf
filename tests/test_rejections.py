"""A worker's 4xx refusal of the request is the request's fault: never failed over, never a breaker strike."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from broker.errors import InvalidRequest, JobFailed, ProviderUnavailable
from broker.routing.manager import CloudGPUManager
from broker.routing.retry import Action, classify, counts_against_provider
from broker.settings import Settings


class Refusing(ThreadingHTTPServer):
    """A worker that is ready and refuses every job with ``status`` (a typed broker error or plain text)."""

    def __init__(self, status: int, typed: bool) -> None:
        self.jobs = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._send(200, b'{"ready": true, "ok": true}')

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                server.jobs += 1
                error = {"type": "InvalidRequest", "field": "input.avatar_preset", "message": "unknown preset"}
                body = json.dumps({"ok": False, "error": error}) if typed else '{"detail": "bad input"}'
                self._send(status, body.encode())

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture(params=[(422, True), (400, False), (422, False)], ids=["422-typed", "400-plain", "422-plain"])
def refusing(request: pytest.FixtureRequest) -> Iterator[Refusing]:
    server = Refusing(*request.param)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_a_refusal_is_not_failed_over_nor_held_against_the_worker(refusing: Refusing, tmp_path: Any) -> None:
    settings = Settings(http={"url": f"http://127.0.0.1:{refusing.server_address[1]}"},
                        ledger={"path": str(tmp_path / "ledger.sqlite")})
    manager = CloudGPUManager(["http"], settings=settings)  # local stays the fallback
    with pytest.raises(InvalidRequest):
        manager.generate_speech("Hello there.")
    assert refusing.jobs == 1  # not retried
    report = manager.last_report
    assert report is not None and [a.provider for a in report.attempts] == ["http"]  # local never tried
    assert manager.health_board["http"].breaker.consecutive_failures == 0


def test_classification_of_provider_4xx() -> None:
    refused = JobFailed("Replicate could not create a prediction (400)", status_code=400)
    assert classify(refused) is Action.ABORT and not counts_against_provider(refused)
    too_big = ProviderUnavailable("too large (HTTP 413)", retryable=False, status_code=413)
    assert classify(too_big) is Action.FAILOVER and not counts_against_provider(too_big)
    down = ProviderUnavailable("HTTP 503", status_code=503)
    assert classify(down) is Action.RETRY and counts_against_provider(down)
