"""`broker serve` over real HTTP on loopback: jobs, outputs, tenants, idempotency, cancel, webhooks, errors."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from pathlib import Path

import httpx
import pytest
import soundfile as sf

from broker.gateway.db import open_database
from broker.gateway.server import open_tables
from broker.gateway.webhooks import verify
from broker.testing.asgi_server import LoopbackServer
from broker.testing.fake import FakeProvider
from tests.gateway_support import SPEECH, WebhookReceiver, fake_manager, gateway_app, wait_state


@pytest.fixture
def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    fast = FakeProvider("fast", usd_per_second=0.001, latency_s=0.02)
    manager = fake_manager(tmp_path, fast)
    with LoopbackServer(gateway_app(tmp_path, manager, webhook_secret="s3cret-hook")) as srv:
        srv.fast = fast  # type: ignore[attr-defined]
        srv.manager = manager  # type: ignore[attr-defined]
        yield srv


def test_speech_job_runs_and_serves_its_wav(server: LoopbackServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/v1/jobs", json=SPEECH)
        assert r.status_code == 202, r.text
        job = r.json()
        assert set(job) == {"id", "state"} and job["state"] == "queued"
        view = wait_state(c, job["id"])
        assert view["state"] == "succeeded", view
        assert view["provider"] == "fast" and view["cost_usd"] > 0
        assert view["attempts"][0]["outcome"] == "succeeded"
        out = c.get(f"/v1/jobs/{job['id']}/output")
        assert out.status_code == 200 and out.headers["content-type"] == "audio/wav"
        samples, rate = sf.read(io.BytesIO(out.content))
        assert rate == 24_000 and len(samples) > rate  # about 3 s of audio for 10 words
        listed = c.get("/v1/jobs").json()["jobs"]
        assert [j["id"] for j in listed] == [job["id"]]
        assert "broker_gateway_jobs{state=\"succeeded\",provider=\"fast\"} 1" in c.get("/metrics").text
        assert c.get("/readyz").status_code == 200 and c.get("/healthz").json()["ok"] is True


def test_bad_bodies_are_typed_4xx_naming_the_field(server: LoopbackServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/v1/jobs", json={"text": "hi"})
        assert r.status_code == 422
        err = r.json()["error"]
        assert err["field"] == "kind" and '"kind": "speech"' in err["message"]  # shows the right shape
        r = c.post("/v1/jobs", json={"kind": "speech", "input": {"text": "   "}})
        assert r.status_code == 422 and r.json()["error"]["field"] == "text"
        r = c.post("/v1/jobs", json={**SPEECH, "options": {"deadline_s": -1}})
        assert r.status_code == 422 and r.json()["error"]["field"] == "options.deadline_s"
        r = c.post("/v1/jobs", content=b"[" * 1000 + b"]" * 1000, headers={"content-type": "application/json"})
        assert r.status_code in (400, 422), r.text
        r = c.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400
        r = c.post("/v1/jobs", content=b"x" * (33 * 1024 * 1024), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.get("/v1/jobs/nope").status_code == 404
    assert server.fast.jobs == []  # type: ignore[attr-defined]  # nothing reached a provider


def test_idempotency_key_replays_and_refuses_a_different_body(server: LoopbackServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        h = {"Idempotency-Key": "book-1-ch-1"}
        first = c.post("/v1/jobs", json=SPEECH, headers=h)
        again = c.post("/v1/jobs", json=SPEECH, headers=h)
        assert first.status_code == 202 and again.status_code == 200
        assert first.json()["id"] == again.json()["id"]
        other = c.post("/v1/jobs", json={**SPEECH, "input": {"text": "Something else."}}, headers=h)
        assert other.status_code == 422 and other.json()["error"]["field"] == "Idempotency-Key"
        wait_state(c, first.json()["id"])
    assert len(server.fast.jobs) == 1  # type: ignore[attr-defined]


def test_tenants_need_keys_and_see_only_their_jobs(tmp_path: Path) -> None:
    async def make_keys() -> tuple[str, str]:
        db = open_database(f"sqlite:///{tmp_path / 'gateway.sqlite'}")
        _, keys = await open_tables(db)
        a, _ = await keys.create("alice", rate_per_minute=2)
        b, _ = await keys.create("bob")
        await db.close()
        return a, b

    key_a, key_b = asyncio.run(make_keys())
    manager = fake_manager(tmp_path, FakeProvider("fast", usd_per_second=0.001))
    with LoopbackServer(gateway_app(tmp_path, manager)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        # an unknown key is refused before the body is even parsed
        assert c.post("/v1/jobs", content=b"{garbage", headers={"Authorization": "Bearer bk_wrong"}).status_code == 401
        assert c.post("/v1/jobs", json=SPEECH).status_code == 401  # keys exist: no anonymous access
        ha, hb = {"Authorization": f"Bearer {key_a}"}, {"X-API-Key": key_b}
        job = c.post("/v1/jobs", json=SPEECH, headers=ha).json()
        assert c.get(f"/v1/jobs/{job['id']}", headers=hb).status_code == 404
        assert c.get(f"/v1/jobs/{job['id']}", headers=ha).status_code == 200
        assert c.get("/v1/jobs", headers=hb).json()["jobs"] == []
        assert c.delete(f"/v1/jobs/{job['id']}", headers=hb).status_code == 404
        c.post("/v1/jobs", json={**SPEECH, "input": {"text": "Two."}}, headers=ha)
        limited = c.post("/v1/jobs", json={**SPEECH, "input": {"text": "Three."}}, headers=ha)
        assert limited.status_code == 429 and limited.headers["retry-after"] == "60"
        assert c.get("/metrics").status_code == 401


def test_delete_cancels_at_the_provider(tmp_path: Path) -> None:
    stuck = FakeProvider("stuck", script=["stuck"], usd_per_second=0.001)
    manager = fake_manager(tmp_path, stuck)
    with LoopbackServer(gateway_app(tmp_path, manager)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        job = c.post("/v1/jobs", json=SPEECH).json()
        wait_state(c, job["id"], ("running",))
        for _ in range(200):  # the manager submits to the provider right after the claim
            if stuck.jobs:
                break
            threading.Event().wait(0.02)
        r = c.delete(f"/v1/jobs/{job['id']}")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        for _ in range(250):  # the runner's next lease renewal sees the cancel (lease 3 s → every 1 s)
            if stuck.jobs and all(j.state.terminal for j in stuck.jobs):
                break
            threading.Event().wait(0.02)
        assert stuck.jobs and all(j.cancel_called for j in stuck.jobs)
        assert c.get(f"/v1/jobs/{job['id']}/output").status_code == 410


def test_webhook_arrives_once_signed(tmp_path: Path) -> None:
    webhook = WebhookReceiver()
    hook, received, got = webhook.app, webhook.received, webhook.got

    manager = fake_manager(tmp_path, FakeProvider("fast", usd_per_second=0.001))
    with LoopbackServer(hook) as receiver, \
            LoopbackServer(gateway_app(tmp_path, manager, webhook_secret="s3cret-hook")) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        job = c.post("/v1/jobs", json={**SPEECH, "webhook_url": f"{receiver.url}/hook"}).json()
        wait_state(c, job["id"])
        assert got.wait(10)
        threading.Event().wait(0.3)  # a duplicate would come right behind the first
    assert len(received) == 1
    headers, body = received[0]
    assert verify("s3cret-hook", headers, body)
    assert not verify("other-secret", headers, body)
    event = json.loads(body)
    assert event["id"] == job["id"] and event["state"] == "succeeded"


def test_a_book_fans_out_and_streams_while_it_runs(tmp_path: Path) -> None:
    import av

    slow = FakeProvider("slow", usd_per_second=0.001, latency_s=0.15)
    manager = fake_manager(tmp_path, slow)
    chapters = [{"title": f"Part {i}", "text": " ".join(f"Sentence {j} of part {i} goes on a while." for j in
                                                        range(40))} for i in range(1, 4)]
    with LoopbackServer(gateway_app(tmp_path, manager)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        for fmt in ("wav", "m4b"):
            r = c.post("/v1/jobs", json={"kind": "long_speech", "input": {"chapters": chapters},
                                         "options": {"output_format": fmt}})
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            wait_state(c, job_id, ("running",))
            with c.stream("GET", f"/v1/jobs/{job_id}/output") as live:  # follows the book as it is written
                assert live.status_code == 200
                parts = list(live.iter_bytes())
            view = wait_state(c, job_id)
            assert view["state"] == "succeeded", view
            summary = view["attempts"][0]
            assert summary["pieces"] > 3 and view["progress"] == 1.0
            if fmt == "wav":
                assert view["cost_usd"] > 0 and summary["pieces_run"] == summary["pieces"]
            else:  # the same book again: every piece comes from the journal, nothing is paid twice
                assert view["cost_usd"] == 0 and summary["pieces_reused"] == summary["pieces"]
            final = c.get(f"/v1/jobs/{job_id}/output").content
            streamed = b"".join(parts)
            assert len(streamed) == len(final)
            if fmt == "wav":
                # the audio arrived as it was made; only the header's sizes are filled in at the end
                assert len(parts) > 2 and streamed[44:] == final[44:]
                samples, rate = sf.read(io.BytesIO(final))
                assert len(samples) / rate > 30
            else:
                assert streamed == final  # an M4B's index comes last: it is sent once the book is done
                with av.open(io.BytesIO(final)) as book:
                    assert [ch["metadata"]["title"] for ch in book.chapters()] == ["Part 1", "Part 2", "Part 3"]


def test_book_bad_input_is_refused_before_anything_runs(server: LoopbackServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        book = {"kind": "long_speech", "input": {"text": "Chapter 1\n\nIt began. " * 30 + "\n\nChapter 2\n\nIt ended."}}
        forecast = c.post("/v1/quote", json=book)  # a book is quoted over 1..64 workers; nothing runs
        assert forecast.status_code == 200, forecast.text
        rows = forecast.json()["rows"]
        assert forecast.json()["chapters"] == 2 and [r["workers"] for r in rows][:4] == [1, 4, 16, 64]
        r = c.post("/v1/jobs", json={"kind": "long_speech", "input": {"chapters": []}})
        assert r.status_code == 422 and r.json()["error"]["field"] == "input.chapters"
        r = c.post("/v1/jobs", json={"kind": "long_speech", "input": {"text": "Hi.", "speaker": -1}})
        assert r.status_code == 422 and r.json()["error"]["field"] == "speaker"
        r = c.post("/v1/jobs", json={"kind": "long_speech", "input": {"text": "Hi."},
                                     "options": {"output_format": "ogg"}})
        assert r.status_code == 422 and r.json()["error"]["field"] == "options.output_format"
    assert server.fast.jobs == []  # type: ignore[attr-defined]


def test_a_books_webhook_is_sent_when_it_ends_not_at_the_next_sweep(tmp_path: Path) -> None:
    webhook = WebhookReceiver()
    hook, received, got = webhook.app, webhook.received, webhook.got

    manager = fake_manager(tmp_path, FakeProvider("fast", usd_per_second=0.001))
    chapters = [{"title": "One", "text": " ".join(f"Sentence {j} goes on for a while." for j in range(30))}]
    # the sweep that resends unsent webhooks waits a minute: only the runner itself can send this one in time
    app = gateway_app(tmp_path, manager, webhook_secret="s3cret-hook", queue_options={"sweep_s": 60.0})
    with LoopbackServer(hook) as receiver, LoopbackServer(app) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        job = c.post("/v1/jobs", json={"kind": "long_speech", "input": {"chapters": chapters},
                                       "webhook_url": f"{receiver.url}/hook"}).json()
        assert wait_state(c, job["id"])["state"] == "succeeded"
        assert got.wait(10), "the book's completion was left to the sweep"
    assert json.loads(received[0][1])["id"] == job["id"]
