"""The one provider-agnostic job function: wire payload in, wire payload out.

Every handler (RunPod, Modal, Replicate, the self-hosted server) is a shim over
``handle``/``handle_stream``; errors never escape as exceptions, they come back as
``{"ok": false, "error": {...}}`` so every provider reports them the same way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx

from broker import engines, wire
from broker.errors import InvalidRequest
from broker.media import Audio
from broker.types import DEFAULT_LIMITS, Limits, RenderRequest, SpeechRequest

log = logging.getLogger(__name__)

#: largest input a worker will fetch from a URL (avatars, context audio)
MAX_FETCH_BYTES = 50 * 1024 * 1024

ProgressFn = Callable[[float], None]


def fetch_url(url: str) -> bytes:
    """Download an input given by URL (bounded in size and time)."""
    try:
        with httpx.stream("GET", url, timeout=30.0, follow_redirects=True) as resp:
            resp.raise_for_status()
            data = bytearray()
            for part in resp.iter_bytes():
                data += part
                if len(data) > MAX_FETCH_BYTES:
                    raise InvalidRequest("url", f"input at URL is over {MAX_FETCH_BYTES} bytes")
            return bytes(data)
    except httpx.HTTPError as exc:
        raise InvalidRequest("url", f"could not fetch input: {type(exc).__name__}") from None


def parse(payload: Any, limits: Limits = DEFAULT_LIMITS) -> SpeechRequest | RenderRequest:
    request = wire.decode_request(payload, fetch=fetch_url)
    request.check_limits(limits)
    engines.check(request)
    return request


def handle(
    payload: Any,
    *,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> dict[str, Any]:
    """Run one job. Never raises for job errors: they are returned as an error payload."""
    job_id = payload.get("id") if isinstance(payload, dict) else None
    job_id = job_id or wire.new_job_id()
    fmt = _audio_format(payload)
    started = time.perf_counter()
    try:
        request = parse(payload, limits)
        if isinstance(request, SpeechRequest):
            audio = engines.synthesize(request, cancel)
            return wire.encode_speech_result(job_id, audio, audio_format=fmt, metrics=_metrics(started))
        video = engines.render(request, progress=progress, cancel=cancel)
        return wire.encode_render_result(job_id, video, metrics=_metrics(started))
    except Exception as exc:  # every failure becomes a typed error payload
        if not isinstance(exc, InvalidRequest):
            log.exception("job %s failed", job_id)
        return wire.encode_error(job_id, exc)


def handle_stream(
    payload: Any,
    *,
    cancel: threading.Event | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Iterator[dict[str, Any]]:
    """Speech as chunk payloads (the last has ``final: true``); an error ends the stream as an error payload."""
    job_id = (payload.get("id") if isinstance(payload, dict) else None) or wire.new_job_id()
    fmt = _audio_format(payload)
    try:
        request = parse(payload, limits)
        if not isinstance(request, SpeechRequest):
            raise InvalidRequest("task", "only speech jobs stream")
        pending: Audio | None = None
        index = 0
        for piece in engines.synthesize_stream(request, cancel):
            # Hold one piece back so the last chunk can be marked final.
            if pending is not None:
                yield wire.encode_chunk(job_id, index, pending, final=False, text=pending.text, audio_format=fmt)
                index += 1
            pending = piece
        if pending is not None:
            yield wire.encode_chunk(job_id, index, pending, final=True, text=pending.text, audio_format=fmt)
    except Exception as exc:
        if not isinstance(exc, InvalidRequest):
            log.exception("stream %s failed", job_id)
        yield wire.encode_error(job_id, exc)


async def ahandle(payload: Any, *, progress: ProgressFn | None = None, limits: Limits = DEFAULT_LIMITS
                  ) -> dict[str, Any]:
    """``handle`` off the event loop, for async handlers (RunPod, Modal, the HTTP worker)."""
    import asyncio

    cancel = threading.Event()
    try:
        return await asyncio.to_thread(handle, payload, progress=progress, cancel=cancel, limits=limits)
    finally:
        cancel.set()  # if we were cancelled, tell the engine thread to stop at its next check


async def ahandle_stream(payload: Any, *, limits: Limits = DEFAULT_LIMITS) -> AsyncIterator[dict[str, Any]]:
    import asyncio

    cancel = threading.Event()
    iterator = handle_stream(payload, cancel=cancel, limits=limits)
    sentinel = object()
    try:
        while True:
            item = await asyncio.to_thread(next, iterator, sentinel)
            if item is sentinel:
                return
            yield item  # type: ignore[misc]
    finally:
        cancel.set()


def _audio_format(payload: Any) -> str:
    try:
        fmt = str(payload.get("output", {}).get("audio_format", "flac"))
    except AttributeError:
        return "flac"
    return fmt if fmt in ("wav", "flac") else "flac"


def _metrics(started: float) -> dict[str, Any]:
    return {"run_s": round(time.perf_counter() - started, 4), "device": engines.device()}
