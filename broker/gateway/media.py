"""Media a job body names by URL, fetched when the gateway accepts the job, and kept with it.

A render's avatar and driving audio (and a speech job's context audio) may be ``{"url": …}``. The gateway
fetches them while it answers ``POST /v1/jobs``, not when the job runs, because that loses nothing:

- a bad URL (unreachable, 404, too large, not audio, a forbidden address) is a typed 4xx to the caller,
  before a job exists, instead of a job that fails minutes later;
- the bytes are stored in the job row, inline like an upload. A job that is rerun (a replica died, its
  lease lapsed) runs on exactly the media that was accepted, even if the URL has since changed or
  expired (presigned URLs do), and no replica fetches it twice;
- nothing has reached a provider or the ledger yet, so a refusal costs nothing.

Fetching at run time would keep rows small, but would turn every bad URL into a failed job and let a
URL's content differ between the first run and a rerun. Rows stay bounded: all the media one job names
may add up to ``gateway.max_body_bytes``, what an upload could have sent anyway.

The fetch itself is the worker's SSRF-safe ``MediaFetcher`` under the ``[gateway.fetch]`` rules.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from broker import wire
from broker.errors import InvalidRequest
from broker.gateway.runner import decode_job_request
from broker.worker.fetch import FetchPolicy, MediaFetcher


class MediaUrls:
    """Decodes job bodies, fetching the media they name by URL under one policy."""

    def __init__(self, policy: FetchPolicy | None = None, *, max_total_bytes: int = 32 * 1024 * 1024) -> None:
        self.policy = policy or FetchPolicy()
        self.max_total_bytes = max_total_bytes

    async def decode(self, body: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """``(request, body to store)``: the stored body carries fetched media inline as ``{"b64"}``.

        Runs in a thread: fetching (and decoding large inline media) must not hold up the event loop."""
        return await asyncio.to_thread(self._decode, body)

    def _decode(self, body: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        fetcher = MediaFetcher(self.policy)
        fetched: dict[str, bytes] = {}
        total = 0

        def fetch(url: str) -> bytes:
            nonlocal total
            if url in fetched:  # one voice sample named by several context segments is fetched once
                return fetched[url]
            data = fetcher(url)
            total += len(data)
            if total > self.max_total_bytes:
                raise InvalidRequest("url", f"the media this job names adds up to over {self.max_total_bytes} "
                                     "bytes (gateway.max_body_bytes)")
            fetched[url] = data
            return data

        # decode_job_request checks every cheap field and the limits before it fetches the first URL
        request = decode_job_request(body, fetch=fetch)
        return request, (inline(body, fetched) if fetched else body)


def inline(body: dict[str, Any], fetched: dict[str, bytes]) -> dict[str, Any]:
    """A copy of ``body`` with each fetched ``{"url"}`` media replaced by its bytes (the wire's MEDIA form)."""
    out = copy.deepcopy(body)
    inp = out.get("input")
    if not isinstance(inp, dict):
        return out
    slots: list[tuple[dict[str, Any], str]] = [(inp, "audio"), (inp, "avatar")]
    context = inp.get("context")
    if isinstance(context, list):
        slots += [(seg, "audio") for seg in context if isinstance(seg, dict)]
    for holder, name in slots:
        media = holder.get(name)
        if isinstance(media, dict) and isinstance(media.get("url"), str) and media["url"] in fetched:
            holder[name] = wire.encode_media(fetched[media["url"]], str(media.get("mime") or ""))
    return out
