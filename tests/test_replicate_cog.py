"""handlers/replicate under the real Cog runtime (coglet 0.23, no Docker), through Cog's own HTTP API."""

from __future__ import annotations

import base64
import inspect
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from broker import wire
from broker.errors import InvalidRequest
from broker.media import Audio
from broker.testing.cog_runtime import HANDLER_DIR
from broker.types import Segment, SpeechRequest, build
from tests.replicate_support import shared_runtime

pytestmark = pytest.mark.usefixtures("piper_available")


@pytest.fixture(autouse=True)
def _idle_runtime() -> None:
    # These tests talk to Cog directly, and Cog answers 409 while an earlier test's job still runs.
    shared_runtime().wait_idle()


def _payload(data_url: str) -> Any:
    assert data_url.startswith("data:application/json;base64,")
    return json.loads(base64.b64decode(data_url.partition(",")[2]))


def _predict(inputs: dict[str, Any], **body: Any) -> httpx.Response:
    return httpx.post(f"{shared_runtime().url}/predictions", json={"input": inputs, **body}, timeout=120)


def test_sync_prediction_runs_a_speech_job() -> None:
    job = wire.encode_request(build(SpeechRequest, text="Hello from the Cog runtime."), job_id="cog1")
    resp = _predict({"job": json.dumps(job)})
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "succeeded" and body["metrics"]["predict_time"] > 0
    [result] = [_payload(item) for item in body["output"]]
    assert result["ok"] and result["id"] == "cog1"
    audio = wire.decode_result(result)
    assert isinstance(audio, Audio) and audio.rms() > 0.01 and 1.0 < audio.duration_s < 5.0


def test_file_inputs_replace_file_references() -> None:
    context_audio = Audio((np.sin(np.arange(24_000) / 7.0) * 0.3).astype("float32"))
    request = build(SpeechRequest, text="Answer.", context=[Segment(speaker=0, text="Question?",
                                                                     audio=context_audio)])
    job = wire.encode_request(request)
    job["input"]["context"][0]["audio"] = {"file": 0, "mime": "audio/flac"}
    data_url = "data:audio/flac;base64," + base64.b64encode(context_audio.to_bytes("flac")).decode()
    result = _payload(_predict({"job": json.dumps(job), "files": [data_url]}).json()["output"][0])
    assert result["ok"], result
    # A reference to a file that was not given is the caller's mistake, reported as such.
    bad = _payload(_predict({"job": json.dumps(job)}).json()["output"][0])
    with pytest.raises(InvalidRequest):
        wire.decode_result(bad)


def test_text_input_for_the_web_form_yields_flac() -> None:
    body = _predict({"text": "Hi there."}).json()
    assert body["output"][0].startswith("data:audio/flac;base64,")
    audio = Audio.from_bytes(base64.b64decode(body["output"][0].partition(",")[2]))
    assert audio.duration_s > 0.3


def test_schema_validates_at_the_edge() -> None:
    resp = _predict({"speaker": -1})
    assert resp.status_code == 422
    assert "speaker" in resp.text


def test_async_prediction_with_webhooks_streams_chunks() -> None:
    # Cog sends its webhooks concurrently (one task each), so they may arrive in any order: a
    # "processing" event can land after "succeeded". The terminal event is kept as it arrives and waited
    # on; nothing assumes the last event received is the last one sent.
    events: list[dict[str, Any]] = []
    terminal: list[dict[str, Any]] = []
    lock = threading.Lock()
    done = threading.Event()

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            with lock:
                events.append(body)
                if body["status"] in ("succeeded", "failed", "canceled"):
                    terminal.append(body)
                    done.set()
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    hook = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        job = wire.encode_request(build(SpeechRequest, text="One. Two. Three."), stream=True)
        resp = httpx.post(f"{shared_runtime().url}/predictions", headers={"Prefer": "respond-async"},
                          json={"input": {"job": json.dumps(job)},
                                "webhook": f"http://127.0.0.1:{hook.server_port}/hook"}, timeout=30)
        assert resp.status_code == 202 and resp.json()["status"] == "starting"
        assert done.wait(60), events
    finally:
        hook.shutdown()
    with lock:
        seen = list(events)
        (final,) = terminal
    assert final["status"] == "succeeded", final
    chunks = [wire.decode_chunk(_payload(item)) for item in final["output"]]
    assert [c[0] for c in chunks] == list(range(len(chunks))) and chunks[-1][1]
    assert len(chunks) >= 3
    # Outputs arrived progressively, not all at the end.
    assert any(0 < len(e.get("output") or []) < len(chunks) for e in seen)


def test_cancel_stops_a_running_prediction() -> None:
    job = wire.encode_request(build(SpeechRequest, text=" ".join(["A long sentence to keep the worker busy."] * 60)))
    url = shared_runtime().url
    resp = httpx.post(f"{url}/predictions", headers={"Prefer": "respond-async"},
                      json={"id": "cancel-me", "input": {"job": json.dumps(job)}}, timeout=30)
    assert resp.status_code == 202
    time.sleep(0.3)
    assert httpx.post(f"{url}/predictions/cancel-me/cancel", timeout=30).status_code == 200
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the slot frees once the runner stops
        if httpx.get(f"{url}/health-check").json()["status"] == "READY":
            break
        time.sleep(0.1)
    assert httpx.get(f"{url}/health-check").json()["status"] == "READY"


def test_checked_in_schema_matches_the_runner() -> None:
    """The schema `cog build` would generate is checked in; it must agree with run()'s signature."""
    schema = json.loads((HANDLER_DIR / ".cog" / "openapi_schema.json").read_text())
    source = (HANDLER_DIR / "run.py").read_text()
    namespace: dict[str, Any] = {}
    exec(compile(source, str(HANDLER_DIR / "run.py"), "exec"), namespace)  # defines Runner; runs no setup
    params = [p for p in inspect.signature(namespace["Runner"].run).parameters if p != "self"]
    props = schema["components"]["schemas"]["Input"]["properties"]
    assert sorted(props, key=lambda k: props[k]["x-order"]) == params
    assert schema["paths"]["/predictions"]["post"]["x-cog-streaming"] is True
    assert schema["components"]["schemas"]["Output"]["x-cog-array-type"] == "iterator"
    assert "run.py:Runner" in (Path(HANDLER_DIR) / "cog.yaml").read_text()
