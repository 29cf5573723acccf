"""handlers/modal/app.py: imports offline, its class runs real jobs with `.local()`, its ASGI app serves them.

Modal 1.6.4 runs a ``@modal.method`` locally with ``Obj.method.local(...)``: it builds the user
class and runs the ``@modal.enter`` hooks (snap=True and snap=False) once per instance first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from broker import wire
from broker.media import Audio, Video
from broker.testing.asgi_server import LoopbackServer
from broker.types import RenderRequest, SpeechRequest, build
from broker.worker import handle
from tests.modal_helpers import APP_FILE, ROOT, load_modal_app

pytestmark = pytest.mark.usefixtures("piper_available")


def _import_in_subprocess(env: dict[str, str], code: str) -> dict[str, Any]:
    """Import the app in a clean interpreter with no Modal credentials and no reachable Modal server."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "BROKER_MODAL"))}
    script = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('app', {str(APP_FILE)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n" + code
    )
    proc = subprocess.run([sys.executable, "-c", script], env={**base, **env}, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_app_imports_offline_without_credentials(tmp_path: Any) -> None:
    code = (
        "fn = m.BrokerWorker._get_class_service_function()\n"
        "print(json.dumps({'app': m.app.name, 'gpu': fn._spec_.gpus, 'cfg': m.cfg.model_dump(mode='json'),\n"
        "  'methods': sorted(m.BrokerWorker._get_method_names()) if hasattr(m.BrokerWorker, '_get_method_names')"
        " else None,\n"
        "  'heavy': [k for k in sys.modules if k.split('.')[0] in ('torch', 'piper', 'onnxruntime')]}))\n"
    )
    env = {"HOME": str(tmp_path), "MODAL_SERVER_URL": "http://127.0.0.1:9", "MODAL_CONFIG_PATH": str(tmp_path / "none")}
    out = _import_in_subprocess(env, code)
    assert out["app"] == "broker" and out["gpu"] == "A10G"
    assert out["methods"] == ["run_job", "stream_job", "web"]
    assert out["heavy"] == [], "engines load in @modal.enter, not at import"

    tuned = _import_in_subprocess(
        {**env, "BROKER_MODAL__HARDWARE": "L40S", "BROKER_MODAL__MIN_CONTAINERS": "1",
         "BROKER_MODAL__SCALEDOWN_WINDOW_S": "300", "BROKER_MODAL__APP_NAME": "broker-staging",
         "BROKER_MODAL__MEMORY_SNAPSHOT": "false"},
        code,
    )
    assert tuned["app"] == "broker-staging" and tuned["gpu"] == "L40S"
    assert tuned["cfg"]["min_containers"] == 1 and tuned["cfg"]["scaledown_window_s"] == 300
    assert tuned["cfg"]["memory_snapshot"] is False


@pytest.fixture(scope="module")
def worker_obj() -> Any:
    return load_modal_app().BrokerWorker()


def test_local_method_runs_a_real_speech_job(worker_obj: Any) -> None:
    payload = wire.encode_request(build(SpeechRequest, text="Hello from the Modal class."))
    result = worker_obj.run_job.local(payload)
    assert result["ok"] is True and result["id"] == payload["id"]
    audio = wire.decode_result(result)
    assert isinstance(audio, Audio) and audio.rms() > 0.01 and audio.duration_s > 1.0

    bad = worker_obj.run_job.local({"v": 1, "task": "speech", "input": {"text": "hi", "speaker": 9}})
    assert bad["ok"] is False and bad["error"]["field"] == "speaker"


def test_local_generator_method_streams(worker_obj: Any) -> None:
    payload = wire.encode_request(build(SpeechRequest, text="First. Second. Third."), stream=True)
    chunks = list(worker_obj.stream_job.local(payload))
    assert [c["chunk"]["index"] for c in chunks] == list(range(len(chunks)))
    assert [c["chunk"]["final"] for c in chunks] == [False] * (len(chunks) - 1) + [True]


def test_local_render_matches_handle(worker_obj: Any) -> None:
    payload = wire.encode_request(build(RenderRequest, text="Hello."))
    remote, local = worker_obj.run_job.local(payload), handle(payload)
    assert remote["ok"] == local["ok"]
    if local["ok"]:
        video = wire.decode_result(remote)
        assert isinstance(video, Video) and video.data[4:8] == b"ftyp"
        assert abs(video.frames - local["frames"]) <= 3, "same text, same engine (Piper's sampling varies a little)"
    else:  # the render engine is still being built: the same typed error either way
        assert remote["error"] == local["error"]


@pytest.fixture(scope="module")
def asgi_server(worker_obj: Any) -> Iterator[LoopbackServer]:
    with LoopbackServer(worker_obj.web.local()) as server:
        yield server


def test_asgi_app_serves_the_worker_api(asgi_server: LoopbackServer) -> None:
    assert httpx.get(f"{asgi_server.url}/health").json() == {"ok": True}
    ready = httpx.get(f"{asgi_server.url}/ready").json()
    assert ready["ready"] is True, "the @modal.enter hooks already loaded the engines"
    payload = wire.encode_request(build(SpeechRequest, text="Served by the Modal web endpoint."))
    r = httpx.post(f"{asgi_server.url}/run", json=payload, timeout=60)
    assert r.status_code == 200
    audio = wire.decode_result(r.json())
    assert isinstance(audio, Audio) and audio.rms() > 0.01
