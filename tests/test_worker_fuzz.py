"""schemathesis against the worker's own OpenAPI document: no generated body may get a 5xx.

The real worker (real Piper, real renderer) runs on loopback with tight limits, as an operator may
configure them, so the valid bodies schemathesis finds stay small. The run is bounded and
derandomized (the same examples every run), positive and negative bodies for /run and /stream.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from broker.testing.asgi_server import LoopbackServer
from broker.types import Limits
from broker.worker.server import MiB, create_app

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

pytestmark = [pytest.mark.usefixtures("piper_available"), pytest.mark.slow]

KEY = "fuzz-key-2b81"
AUTH = {"Authorization": f"Bearer {KEY}"}
#: small enough that a valid job is a fraction of a second of speech or a few frames of video
LIMITS = Limits(max_text_chars=40, max_context_segments=2, max_render_frames=40, max_avatar_bytes=256 * 1024,
                max_image_pixels=1_000_000, max_render_seconds=5.0, max_length_ms=3000.0)
EXAMPLES = {GenerationMode.POSITIVE: 50, GenerationMode.NEGATIVE: 50}


@pytest.fixture(scope="module")
def worker() -> Iterator[LoopbackServer]:
    with LoopbackServer(create_app(api_key=KEY, max_body_bytes=2 * MiB, limits=LIMITS)) as server:
        yield server


def test_openapi_needs_the_key_and_shows_examples(worker: LoopbackServer) -> None:
    assert httpx.get(f"{worker.url}/openapi.json").status_code == 401
    doc = httpx.get(f"{worker.url}/openapi.json", headers=AUTH).json()
    examples = doc["paths"]["/run"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert set(examples) == {"speech", "render"}
    # the document states this worker's limits
    assert doc["components"]["schemas"]["SpeechInput"]["properties"]["text"]["maxLength"] == 40
    # and its speech example really runs
    run = httpx.post(f"{worker.url}/run", json=examples["speech"]["value"], headers=AUTH, timeout=60)
    assert run.status_code == 200 and run.json()["ok"] is True


@pytest.mark.parametrize("mode", list(EXAMPLES), ids=str)
@pytest.mark.parametrize("path", ["/run", "/stream"])
def test_no_generated_body_gets_a_5xx(worker: LoopbackServer, path: str, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{worker.url}/openapi.json", headers=AUTH)
    operation = schema[path]["POST"]
    seen: list[int] = []

    @settings(max_examples=EXAMPLES[mode], derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: schemathesis.Case) -> None:
        # schemathesis serialises the body as the schema's media type says (negative bodies included)
        response = case.call(base_url=worker.url, headers=AUTH, timeout=120)
        seen.append(response.status_code)
        assert response.status_code < 500, f"{response.status_code} for {case.body!r}: {response.text[:300]}"

    check()
    assert len(seen) >= EXAMPLES[mode] // 2  # it ran (hypothesis may stop early once the space is exhausted)
    if mode is GenerationMode.POSITIVE:
        assert 200 in seen  # valid bodies were generated and served, not only rejected
