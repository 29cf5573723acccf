"""Media URLs in a job: no SSRF. A loopback server counts every request the worker makes to it."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from broker.errors import InvalidRequest
from broker.worker import handle
from broker.worker.fetch import UNREACHABLE, FetchPolicy, MediaFetcher
from tests.http_support import TONE_FLAC, MediaHost, serving

OPEN = FetchPolicy(allow_http=True, allow_private=True)


@pytest.fixture
def loopback() -> Iterator[MediaHost]:
    """Serves /tone.flac, redirects /hop to it, 404 otherwise; records every request."""
    yield from serving(MediaHost({"/tone.flac": (None, TONE_FLAC)}, redirects={"/hop": "/tone.flac"}))


def _speech_with_context(*urls: str) -> dict[str, Any]:
    context = [{"speaker": 0, "text": "earlier", "audio": {"url": u, "mime": "audio/flac"}} for u in urls]
    return {"v": 1, "id": "j", "task": "speech", "input": {"text": "Hello.", "context": context}}


def _error(result: dict[str, Any]) -> dict[str, Any]:
    assert result["ok"] is False, result
    return dict(result["error"])


def test_loopback_urls_are_never_requested_by_default(loopback: MediaHost) -> None:
    port = loopback.server_address[1]
    urls = [f"http://127.0.0.1:{port}/tone.flac", f"https://127.0.0.1:{port}/tone.flac",
            f"https://localhost:{port}/tone.flac", f"https://[::ffff:127.0.0.1]:{port}/x",
            "https://169.254.169.254/latest/meta-data/", "https://10.0.0.1/x"]
    for url in urls:
        error = _error(handle(_speech_with_context(url)))
        assert error["type"] == "InvalidRequest" and error["field"] == "input.context.0.audio", error
    assert loopback.requests == []


def test_limits_are_checked_before_any_fetch(loopback: MediaHost) -> None:
    url = f"http://127.0.0.1:{loopback.server_address[1]}/tone.flac"
    error = _error(handle(_speech_with_context(*[url] * 40), fetch_policy=OPEN))
    assert error["field"] == "input.context" and "over the limit" in error["message"]
    bad_fps = {"v": 1, "task": "render", "input": {"audio": {"url": url}, "fps": 2e-6}}
    assert _error(handle(bad_fps, fetch_policy=OPEN))["field"] == "fps"
    assert loopback.requests == []


def test_allowed_private_fetch_follows_redirects_and_caps_size(loopback: MediaHost) -> None:
    base = f"http://127.0.0.1:{loopback.server_address[1]}"
    assert MediaFetcher(OPEN)(f"{base}/hop") == TONE_FLAC
    assert loopback.requests == ["/hop", "/tone.flac"]
    with pytest.raises(InvalidRequest, match=UNREACHABLE):
        MediaFetcher(FetchPolicy(allow_http=True, allow_private=True, max_bytes=100))(f"{base}/tone.flac")
    fetcher = MediaFetcher(FetchPolicy(allow_http=True, allow_private=True, max_fetches=1))
    fetcher(f"{base}/tone.flac")
    with pytest.raises(InvalidRequest, match="at most 1 URLs"):
        fetcher(f"{base}/tone.flac")


def test_errors_read_the_same_whatever_is_at_the_port(loopback: MediaHost) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    open_port = loopback.server_address[1]
    messages = set()
    for url in (f"http://127.0.0.1:{closed}/x", f"http://127.0.0.1:{open_port}/missing",
                "http://no-such-host.invalid/x"):
        with pytest.raises(InvalidRequest) as info:
            MediaFetcher(OPEN)(url)
        messages.add(info.value.message)
    assert messages == {f"url: {UNREACHABLE}"}


def test_the_checked_address_is_the_one_connected_and_redirects_are_rechecked(loopback: MediaHost) -> None:
    """DNS is asked once per hop and the request goes to that address (no rebinding between check
    and connect); a public server's redirect into loopback is refused before any request is made."""
    port = loopback.server_address[1]
    asked: list[str] = []
    seen: list[httpx.Request] = []

    def resolver(host: str, _: int) -> list[str]:
        asked.append(host)
        return ["93.184.216.34"] if len(asked) == 1 else ["127.0.0.1"]  # a rebinding DNS answer

    def public_server(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(302, headers={"Location": f"https://cdn.example:{port}/tone.flac"})

    fetcher = MediaFetcher(FetchPolicy(), resolver=resolver, transport=httpx.MockTransport(public_server))
    with pytest.raises(InvalidRequest, match=UNREACHABLE):
        fetcher("https://cdn.example/avatar.png")
    assert [r.url.host for r in seen] == ["93.184.216.34"]
    assert seen[0].headers["host"] == "cdn.example" and seen[0].extensions["sni_hostname"] == "cdn.example"
    assert asked == ["cdn.example", "cdn.example"] and loopback.requests == []


def test_only_https_unless_configured() -> None:
    with pytest.raises(InvalidRequest, match="must be https"):
        MediaFetcher()("http://example.com/a.flac")
    with pytest.raises(InvalidRequest, match="credentials"):
        MediaFetcher()("https://user:pw@example.com/a.flac")
