"""The official `replicate` client (1.0.7) against the emulator, which forwards to the real Cog runtime."""

from __future__ import annotations

import io
import json

import httpx
import pytest

from broker import wire
from broker.media import Audio
from broker.types import SpeechRequest, build
from tests.replicate_support import TOKEN, emulator

replicate = pytest.importorskip("replicate")
pytestmark = pytest.mark.usefixtures("piper_available")


def _job(text: str, *, stream: bool = False) -> str:
    return json.dumps(wire.encode_request(build(SpeechRequest, text=text), stream=stream))


def _read(url: str) -> dict[str, object]:
    resp = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"})
    resp.raise_for_status()
    data: dict[str, object] = resp.json()
    return data


def test_create_wait_and_read_output() -> None:
    with emulator() as server:
        client = replicate.Client(api_token=TOKEN, base_url=server.url)
        prediction = client.predictions.create(model="broker/broker", input={"job": _job("Hello, client.")})
        assert prediction.status in ("starting", "processing", "succeeded")
        assert prediction.urls["stream"].startswith(server.url)
        prediction.wait()
        assert prediction.status == "succeeded"
        assert prediction.metrics["predict_time"] > 0
        audio = wire.decode_result(_read(prediction.output[0]))
        assert isinstance(audio, Audio) and audio.rms() > 0.01
        # Output files need the token, like API outputs on replicate.delivery.
        assert httpx.get(prediction.output[0]).status_code == 401
        again = client.predictions.get(prediction.id)
        assert again.output == prediction.output and again.completed_at


def test_run_blocks_with_prefer_wait() -> None:
    with emulator() as server:
        client = replicate.Client(api_token=TOKEN, base_url=server.url)
        output = client.run("broker/broker", input={"job": _job("Blocking run.")})
        assert isinstance(output, list) and len(output) == 1
        assert ("POST", "/v1/models/broker/broker/predictions", 201) in server.emulator.calls
        assert not any(path.startswith("/v1/predictions/") for _, path, _ in server.emulator.calls)


def test_stream_yields_output_events_then_done() -> None:
    with emulator() as server:
        client = replicate.Client(api_token=TOKEN, base_url=server.url)
        events = list(client.stream("broker/broker", input={"job": _job("First. Second. Third.", stream=True)}))
        chunks = [wire.decode_chunk(_read(str(e.data))) for e in events if e.event.value == "output"]
    kinds = [e.event.value for e in events]
    assert kinds[-1] == "done" and kinds.count("output") >= 3
    assert all(e.id for e in events)
    assert [c[0] for c in chunks] == list(range(len(chunks))) and chunks[-1][1]


def test_files_api_and_file_input() -> None:
    with emulator() as server:
        client = replicate.Client(api_token=TOKEN, base_url=server.url)
        created = client.files.create(io.BytesIO(b"hello"), filename="note.txt")
        assert created.size == 5 and created.urls["get"] == f"{server.url}/v1/files/{created.id}"
        assert [f.id for f in client.files.list()] == [created.id]
        assert httpx.get(f"{created.urls['get']}/download").status_code == 401
        # A model sees the file through a signed URL, without the token (Cog downloads it).
        # (Predictions.create drops `wait` when given a model; the models namespace keeps it.)
        prediction = client.models.predictions.create(
            model="broker/broker", input={"job": "", "text": "File test.", "files": [created.urls["get"]]}, wait=30
        )
        assert prediction.status == "succeeded", prediction.error
        assert client.files.delete(created.id)


def test_wrong_token_is_401() -> None:
    with emulator() as server:
        client = replicate.Client(api_token="r8_wrong", base_url=server.url)
        with pytest.raises(replicate.exceptions.ReplicateError) as info:
            client.models.get("broker/broker")
        assert info.value.status == 401


def test_deployments_crud() -> None:
    with emulator() as server:
        client = replicate.Client(api_token=TOKEN, base_url=server.url)
        version = client.models.get("broker/broker").latest_version.id
        dep = client.deployments.create(name="speech", model="broker/broker", version=version,
                                        hardware="gpu-t4", min_instances=0, max_instances=2)
        assert dep.current_release.configuration.hardware == "gpu-t4"
        dep = client.deployments.update("broker", "speech", max_instances=3)
        assert dep.current_release.number == 2 and dep.current_release.configuration.max_instances == 3
        prediction = client.deployments.predictions.create("broker/speech", input={"job": _job("Deployed.")},
                                                           wait=30)
        assert prediction.status == "succeeded"
        assert [d.name for d in client.deployments.list()] == ["speech"]
