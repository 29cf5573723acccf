"""Media by URL through `broker serve`: fetched SSRF-safe when the job is accepted, every refusal a typed 4xx.

Real HTTP all the way: the gateway under uvicorn on loopback, and a plain HTTP server on loopback that
serves the media and counts every request it gets, so "refused" means "never asked".
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.settings import Settings
from broker.testing.asgi_server import LoopbackServer
from broker.testing.fake import FakeProvider
from broker.worker.fetch import UNREACHABLE, FetchPolicy
from tests.gateway_support import fake_manager, gateway_app, wait_state
from tests.http_support import TONE_FLAC, MediaHost, serving

FACE = resources.files("broker").joinpath("assets/avatar.jpg").read_bytes()
#: the gateway's per-URL cap in these tests; /big sends more than this without declaring a length
CAP = 256 * 1024


def _media_host(host: str) -> MediaHost:
    page = b"<html><body>not a face</body></html>"
    return MediaHost({"/face.jpg": ("image/jpeg", FACE), "/voice.flac": ("audio/flac", TONE_FLAC),
                      "/page.html": ("text/html", page)},
                     unsized={"/big": ("image/jpeg", FACE * (4 * CAP // len(FACE) + 1))},
                     redirects={"/hop": "/face.jpg"}, host=host)  # /elsewhere: set by the test


@pytest.fixture
def media() -> Iterator[MediaHost]:
    yield from serving(_media_host("127.0.0.1"))


@pytest.fixture
def inner() -> Iterator[MediaHost]:
    """Another loopback address (all of 127/8 is loopback on Linux): stands for a private service."""
    yield from serving(_media_host("127.0.0.2"))


def _gateway(tmp_path: Path, **fetch: Any) -> tuple[LoopbackServer, FakeProvider]:
    fast = FakeProvider("fast", usd_per_second=0.001, keep_jobs=True)
    app = gateway_app(tmp_path, fake_manager(tmp_path, fast), fetch={"fetch_max_bytes": CAP, **fetch})
    return LoopbackServer(app), fast


def _render(avatar: str, audio: str | None = None) -> dict[str, Any]:
    inp: dict[str, Any] = {"avatar": {"url": avatar, "mime": "image/jpeg"}, "fps": 25, "size": 256}
    if audio is None:
        inp["text"] = "Hello there."
    else:
        inp["audio"] = {"url": audio, "mime": "audio/flac"}
    return {"kind": "render", "input": inp}


def _refused(c: httpx.Client, body: dict[str, Any], field: str = "input.avatar") -> dict[str, Any]:
    r = c.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    err: dict[str, Any] = r.json()["error"]
    assert err["type"] == "InvalidRequest" and err["field"] == field, err
    return err


def test_default_rules_never_ask_a_loopback_or_private_address(tmp_path: Path, media: MediaHost) -> None:
    # http allowed, so what refuses the loopback URLs below is the address rule, not the scheme
    srv, fast = _gateway(tmp_path, allow_http_urls=True)
    with srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        port = media.server_address[1]
        for url in (media.url("/face.jpg"), media.url("/face.jpg", "https"), f"http://localhost:{port}/face.jpg",
                    f"http://[::ffff:127.0.0.1]:{port}/face.jpg", "http://169.254.169.254/latest/meta-data/",
                    "http://10.0.0.1/face.jpg"):
            _refused(c, _render(url))
        _refused(c, {"kind": "speech", "input": {"text": "Hi.", "context": [
            {"speaker": 0, "text": "before", "audio": {"url": media.url("/voice.flac")}}]}}, "input.context.0.audio")
        assert c.get("/v1/jobs").json()["jobs"] == []  # no job was created
    assert media.requests == [] and fast.submits == 0


def test_the_default_is_https_only(tmp_path: Path, media: MediaHost) -> None:
    srv, fast = _gateway(tmp_path, allow_hosts=["127.0.0.1"])  # even a named host is not fetched over http
    with srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        assert "https" in _refused(c, _render(media.url("/face.jpg")))["message"]
    assert media.requests == [] and fast.submits == 0


def test_allowed_host_is_fetched_once_at_accept_and_runs(tmp_path: Path, media: MediaHost) -> None:
    srv, fast = _gateway(tmp_path, allow_http_urls=True, allow_hosts=["127.0.0.1"])
    with srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/v1/jobs", json=_render(media.url("/hop"), media.url("/voice.flac")))
        assert r.status_code == 202, r.text
        assert sorted(media.requests) == ["/face.jpg", "/hop", "/voice.flac"]  # before the 202
        view = wait_state(c, r.json()["id"])
        assert view["state"] == "succeeded", view
        assert c.get(f"/v1/jobs/{view['id']}/output").headers["content-type"] == "video/mp4"
        # a quote fetches too (a render's price follows its audio), and stores nothing
        assert c.post("/v1/quote", json=_render(media.url("/face.jpg"), media.url("/voice.flac"))).status_code == 200
    assert len(media.requests) == 5  # the run fetched nothing: it used the bytes stored with the job
    sent = fast.jobs[0].request
    assert sent.avatar == FACE and sent.audio is not None and abs(sent.audio.duration_s - 1.0) < 0.01
    with sqlite3.connect(tmp_path / "gateway.sqlite") as db:
        (stored,) = db.execute("SELECT request FROM gateway_jobs WHERE id = ?", (view["id"],)).fetchone()
    inp = json.loads(stored)["input"]
    assert "url" not in inp["avatar"] and "url" not in inp["audio"] and inp["avatar"]["mime"] == "image/jpeg"


def test_bad_urls_are_typed_4xx_and_reach_no_provider(tmp_path: Path, media: MediaHost) -> None:
    srv, fast = _gateway(tmp_path, allow_http_urls=True, allow_hosts=["127.0.0.1"])
    with srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        # one text for every network outcome, so the error cannot be used to scan (the log has the reason)
        assert _refused(c, _render(media.url("/missing")))["message"] == f"input.avatar: {UNREACHABLE}"
        assert _refused(c, _render(media.url("/big")))["message"] == f"input.avatar: {UNREACHABLE}"
        # fetched, but not what the field holds: judged by the bytes (servers label media loosely)
        assert "not a PNG, JPEG" in _refused(c, _render(media.url("/page.html")), "avatar")["message"]
        _refused(c, _render(media.url("/face.jpg"), media.url("/page.html")), "input.audio")
        _refused(c, _render("ftp://127.0.0.1/face.jpg"))
        _refused(c, _render(media.url("/face.jpg").replace("http://", "http://user:pw@")))
        assert c.get("/v1/jobs").json()["jobs"] == []
    assert "/big" in media.requests and fast.submits == 0


def test_a_redirect_to_a_private_address_is_refused(tmp_path: Path, media: MediaHost, inner: MediaHost) -> None:
    srv, fast = _gateway(tmp_path, allow_http_urls=True, allow_hosts=["127.0.0.1"])
    with srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        for target in (inner.url("/face.jpg"), "http://169.254.169.254/latest/meta-data/"):
            media.redirects["/elsewhere"] = target
            _refused(c, _render(media.url("/elsewhere")))
    assert media.requests == ["/elsewhere", "/elsewhere"] and inner.requests == [] and fast.submits == 0


def test_an_allowed_network_admits_its_addresses_only() -> None:
    cfg = Settings(gateway={"fetch": {"allow_networks": "127.0.0.2/32, 10.20.0.0/16",
                                      "allow_hosts": "Media.Internal"}}).gateway.fetch
    policy = FetchPolicy.from_settings(cfg, max_bytes=1024)
    assert policy.max_bytes == 1024 and policy.allow_hosts == frozenset({"media.internal"})
    import ipaddress

    def allows(host: str, address: str) -> bool:
        return policy.allows(host, ipaddress.ip_address(address))

    assert allows("x", "127.0.0.2") and allows("x", "10.20.3.4") and allows("x", "::ffff:10.20.3.4")
    assert not allows("x", "127.0.0.1") and not allows("x", "10.21.0.1") and not allows("x", "169.254.169.254")
    assert allows("media.internal", "10.99.0.1") and allows("example.com", "93.184.215.14")
    with pytest.raises(Exception, match="allow_hosts"):
        Settings(gateway={"fetch": {"allow_hosts": ["http://media.internal/"]}})
