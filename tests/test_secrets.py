"""Credentials never travel back: an upstream that echoes our request headers into its error bodies.

Every provider kind is pointed at one loopback server that answers each request with its headers in
the body. None of the five HTTP credentials may then appear on stderr, in ``--json``, in
``broker providers`` or in the ledger's rows.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from broker.errors import JobFailed
from broker.redact import MASK, redact_url, register_secret, scrub
from broker.settings import Settings
from tests.conftest import run_cli

SECRETS = {
    "RUNPOD_API_KEY": "rpa_RUNPODSECRET0001",
    "REPLICATE_API_TOKEN": "r8_REPLICATESECRET02",
    "BROKER_MODAL__PROXY_KEY": "wk-MODALKEYSECRET03",
    "BROKER_MODAL__PROXY_SECRET": "ws-MODALSECRETSEC04",
    "BROKER_WORKER_API_KEY": "wrk-WORKERSECRET05",
}


CREDENTIAL_HEADERS = ("authorization", "x-api-key", "modal-key", "modal-secret")


class Echo(ThreadingHTTPServer):
    """Answers every request 400 with the request's headers as the error body."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def _echo(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                # credentials first, so that even an adapter that keeps 200 characters would show them
                sent = sorted(self.headers.items(), key=lambda kv: kv[0].lower() not in CREDENTIAL_HEADERS)
                body = json.dumps({"detail": f"you sent {' '.join(f'{k}: {v}' for k, v in sent)}"}).encode()
                self.send_response(400)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = _echo

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture(scope="module")
def echo() -> Iterator[str]:
    server = Echo()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _env(echo: str, tmp_path: Path) -> dict[str, str]:
    return {
        **SECRETS,
        "BROKER_CONFIG": str(Path(__file__).parent / "data" / "empty.toml"),
        "BROKER_LEDGER__PATH": str(tmp_path / "ledger.sqlite"),
        "BROKER_RUNPOD__ENDPOINT_ID": "ep-echo", "BROKER_RUNPOD__BASE_URL": f"{echo}/v2",
        "BROKER_REPLICATE__MODEL": "acme/echo", "BROKER_REPLICATE__BASE_URL": f"{echo}/v1",
        "BROKER_MODAL__URL": echo, "BROKER_HTTP__URL": echo,
        "BROKER_MANAGER__ATTEMPTS_PER_PROVIDER": "1", "BROKER_MANAGER__BACKOFF_INITIAL_S": "0",
    }


def _leaks(text: str) -> list[str]:
    return [name for name, value in SECRETS.items() if value in text]


@pytest.mark.parametrize("provider", ["runpod", "replicate", "modal", "http"])
def test_no_credential_in_errors_json_or_ledger(echo: str, tmp_path: Path, provider: str) -> None:
    env = _env(echo, tmp_path)
    result = run_cli("speak", "Hello there.", "-o", str(tmp_path / "out.wav"), "--provider", provider, "--json",
                     env=env, timeout=120)
    assert result.returncode != 0
    assert "you sent" in result.stderr + result.stdout  # the upstream's words did come back
    assert _leaks(result.stderr + result.stdout) == [], result.stderr
    ledger = tmp_path / "ledger.sqlite"
    if ledger.exists():
        with sqlite3.connect(ledger) as db:
            rows = " ".join(str(tuple(r)) for r in db.execute("SELECT * FROM attempts"))
        assert _leaks(rows) == []


def test_no_credential_in_broker_providers(echo: str, tmp_path: Path) -> None:
    result = run_cli("providers", "--json", env=_env(echo, tmp_path), timeout=120)
    assert _leaks(result.stdout + result.stderr) == [], result.stdout


def test_scrub_masks_registered_secrets_and_header_shapes() -> None:
    register_secret("only-in-a-config-file-77")
    text = JobFailed('said {"authorization": "Bearer abcdefghijk", "X-API-Key": "k1", '
                     '"Modal-Secret": "ws-x"} and only-in-a-config-file-77').message
    assert "abcdefghijk" not in text and '"k1"' not in text and "ws-x" not in text
    assert "only-in-a-config-file-77" not in text and text.count(MASK) == 4
    assert scrub("max tokens 50, speaker 1") == "max tokens 50, speaker 1"


def test_a_password_in_a_url_is_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_HTTP__URL", "https://bob:pw-in-the-url-9@gpu.example:8443/w")
    settings = Settings()
    for text in (repr(settings), str(settings), repr(settings.http), json.dumps(settings.redacted())):
        assert "pw-in-the-url-9" not in text and "gpu.example:8443" in text
    assert redact_url("https://bob:pw@h/x") == "https://bob:****@h/x"
    assert "pw-in-the-url-9" not in JobFailed("cannot reach https://bob:pw-in-the-url-9@gpu.example").message
