"""Outputs in an S3 bucket, for real: moto's S3 server on loopback, the gateway under uvicorn, boto3 between.

The gateway is configured the way an operator would (bucket, prefix, endpoint URL, region, the bucket's
own keys); the test reads the bucket with its own client, so "landed" means S3 has it, not that our code
says so. The secret key must not appear anywhere a caller or an operator's log could see it.
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
import soundfile as sf
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer

from broker.gateway.outputs import S3Outputs
from broker.gateway.server import build_app
from broker.settings import Settings
from broker.testing.asgi_server import LoopbackServer
from broker.testing.fake import FakeProvider
from tests.gateway_support import SPEECH, fake_manager, wait_state

KEY_ID = "AKIAMOTOLOOPBACK0001"
REGION = "eu-west-1"


@pytest.fixture(scope="module")
def s3_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A fresh secret key; boto3 sees no other credentials (no AWS_* variables, profiles or metadata)."""
    import os

    for var in [v for v in os.environ if v.startswith("AWS_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return f"moto-secret-{uuid.uuid4().hex}"


def _bucket(s3_url: str, secret: str, name: str | None = None) -> tuple[Any, str]:
    client = boto3.session.Session().client("s3", endpoint_url=s3_url, region_name=REGION,
                                            aws_access_key_id=KEY_ID, aws_secret_access_key=secret)
    bucket = name or f"outs-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    return client, bucket


def _gateway(tmp_path: Path, s3_url: str, secret: str, bucket: str, *providers: FakeProvider) -> Any:
    settings = Settings(ledger={"path": str(tmp_path / "ledger.sqlite")}, gateway={
        "lease_s": 3.0, "output_dir": str(tmp_path / "not-used"), "s3_bucket": bucket, "s3_prefix": "gw/",
        "s3_endpoint_url": s3_url, "s3_region": REGION, "s3_access_key_id": KEY_ID,
        "s3_secret_access_key": secret})
    manager = fake_manager(tmp_path, *providers)
    # no outputs= : the store is built from the settings, as `broker serve` builds it
    app = build_app(settings, manager, db_url=f"sqlite:///{tmp_path / 'gateway.sqlite'}", host="127.0.0.1")
    return app, settings


def _no_secret_anywhere(secret: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: Any,
                        *texts: str) -> None:
    seen = [r.getMessage() + str(r.exc_info or "") for r in caplog.records]
    # the log searched is the real one: botocore's debug lines show each signed request (key id, no secret)
    assert any(KEY_ID in line for line in seen)
    out, err = capfd.readouterr()
    files = [p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file()]  # job rows, ledger
    for where, text in [("log", "\n".join(seen)), ("stdout", out), ("stderr", err), ("files", "\n".join(files)),
                        *[(f"text {i}", t) for i, t in enumerate(texts)]]:
        assert secret not in text, f"the S3 secret key shows in the {where}"


def test_an_output_lands_in_the_bucket_and_is_served(tmp_path: Path, s3_url: str, secret: str,
                                                     caplog: pytest.LogCaptureFixture, capfd: Any) -> None:
    caplog.set_level(logging.DEBUG)  # botocore's debug lines too: they log every request it signs
    client, bucket = _bucket(s3_url, secret)
    app, settings = _gateway(tmp_path, s3_url, secret, bucket, FakeProvider("fast", usd_per_second=0.001))
    gw = app.state.gateway
    assert isinstance(gw.outputs, S3Outputs)
    with LoopbackServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/v1/jobs", json={**SPEECH, "options": {"output_format": "flac"}})
        assert r.status_code == 202, r.text
        view = wait_state(c, r.json()["id"])
        assert view["state"] == "succeeded", view
        stored = client.get_object(Bucket=bucket, Key=f"gw/{view['id']}.flac")
        data = stored["Body"].read()
        assert stored["ContentType"] == "audio/flac" and len(data) == view["output"]["bytes"]
        samples, rate = sf.read(io.BytesIO(data))
        assert rate == 24_000 and len(samples) > rate
        # the gateway streams the object through itself (no redirect to the bucket)
        out = c.get(f"/v1/jobs/{view['id']}/output")
        assert out.status_code == 200 and out.headers["content-type"] == "audio/flac" and out.content == data
        texts = [r.text, json.dumps(c.get(f"/v1/jobs/{view['id']}").json()), c.get("/v1/jobs").text,
                 c.get("/metrics").text, repr(settings), str(settings), json.dumps(settings.redacted()),
                 repr(gw.outputs), repr(gw)]
        # DELETE on a finished job deletes its object; the record stays and says the output is gone
        assert c.delete(f"/v1/jobs/{view['id']}").status_code == 200
        with pytest.raises(ClientError, match=r"404|Not Found"):
            client.head_object(Bucket=bucket, Key=f"gw/{view['id']}.flac")
        gone = c.get(f"/v1/jobs/{view['id']}/output")
        assert gone.status_code == 410 and gone.json()["error"]["type"] == "Gone"
    assert not (tmp_path / "not-used").exists()  # the directory store was never built
    _no_secret_anywhere(secret, tmp_path, caplog, capfd, *texts)


def test_an_object_removed_behind_the_gateway_is_410(tmp_path: Path, s3_url: str, secret: str) -> None:
    client, bucket = _bucket(s3_url, secret)
    app, _ = _gateway(tmp_path, s3_url, secret, bucket, FakeProvider("fast", usd_per_second=0.001))
    with LoopbackServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        view = wait_state(c, c.post("/v1/jobs", json=SPEECH).json()["id"])
        client.delete_object(Bucket=bucket, Key=f"gw/{view['id']}.wav")  # a lifecycle rule, say
        gone = c.get(f"/v1/jobs/{view['id']}/output")
        assert gone.status_code == 410, gone.text


def test_a_missing_bucket_fails_the_job_typed_without_the_secret(
        tmp_path: Path, s3_url: str, secret: str, caplog: pytest.LogCaptureFixture, capfd: Any) -> None:
    caplog.set_level(logging.DEBUG)
    app, _ = _gateway(tmp_path, s3_url, secret, f"absent-{uuid.uuid4().hex[:8]}",
                      FakeProvider("fast", usd_per_second=0.001))
    with LoopbackServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        view = wait_state(c, c.post("/v1/jobs", json=SPEECH).json()["id"])
        assert view["state"] == "failed", view
        error = view["error"]
        # the store's error reaches the job through the manager's output sink (it names the class it wraps)
        assert error["type"] == "OutputNotKept" and "internal error" not in error["message"], error
        assert "OutputStoreError" in error["message"] and "NoSuchBucket" in error["message"], error
        out = c.get(f"/v1/jobs/{view['id']}/output")
        assert out.status_code == 409 and "NoSuchBucket" in out.text
        texts = [json.dumps(view), out.text]
    _no_secret_anywhere(secret, tmp_path, caplog, capfd, *texts)


def test_a_book_is_uploaded_when_done_and_followed_until_then(tmp_path: Path, s3_url: str, secret: str) -> None:
    client, bucket = _bucket(s3_url, secret)
    slow = FakeProvider("slow", usd_per_second=0.001, latency_s=0.1)
    app, _ = _gateway(tmp_path, s3_url, secret, bucket, slow)
    chapters = [{"title": f"Part {i}", "text": " ".join(f"Sentence {j} of part {i}." for j in range(20))}
                for i in (1, 2)]
    with LoopbackServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/v1/jobs", json={"kind": "long_speech", "input": {"chapters": chapters}})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        wait_state(c, job_id, ("running", "succeeded"))
        with c.stream("GET", f"/v1/jobs/{job_id}/output") as live:  # no local file to follow: waits for S3
            assert live.status_code == 200
            streamed = b"".join(live.iter_bytes())
        view = wait_state(c, job_id)
        assert view["state"] == "succeeded", view
    stored = client.get_object(Bucket=bucket, Key=f"gw/{job_id}.wav")
    data = stored["Body"].read()
    assert stored["ContentType"] == "audio/wav" and streamed == data and len(data) == view["output"]["bytes"]
    samples, rate = sf.read(io.BytesIO(data))
    assert len(samples) / rate > 5
