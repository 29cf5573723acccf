"""The one provider-agnostic job function: wire payload in, wire payload out.

Every handler (RunPod, Modal, Replicate, the self-hosted server) is a shim over
``handle``/``handle_stream``; errors never escape as exceptions, they come back as
``{"ok": false, "error": {...}}`` so every provider reports them the same way.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from broker import engines, wire
from broker.errors import InvalidRequest
from broker.media import Audio, AudioChunk
from broker.types import DEFAULT_LIMITS, Limits, RenderRequest, SpeechRequest
from broker.worker.fetch import FetchPolicy, MediaFetcher

log = logging.getLogger(__name__)

ProgressFn = Callable[[float], None]


@functools.cache
def configured_fetch_policy() -> FetchPolicy:
    """The fetch policy from ``worker.*`` settings (read once per process: handlers have no other config)."""
    from broker.settings import Settings

    return FetchPolicy.from_settings(Settings().worker)


def parse(payload: Any, limits: Limits = DEFAULT_LIMITS, fetch_policy: FetchPolicy | None = None
          ) -> SpeechRequest | RenderRequest:
    fetcher = MediaFetcher(fetch_policy or configured_fetch_policy())
    request = wire.decode_request(payload, fetch=fetcher, limits=limits)
    request.check_limits(limits)
    engines.check(request)
    return request


def _nothing_spoken() -> InvalidRequest:
    # The same text gives the same silence on every provider running this engine: the request's
    # fault, not the worker's, so it is not failed over and never answered as ``ok: true``.
    return InvalidRequest("input.text", "the engine found nothing it can speak in this text")


def _checked_audio(audio: Audio) -> Audio:
    if len(audio) == 0:
        raise _nothing_spoken()
    return audio


def handle(
    payload: Any,
    *,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    limits: Limits = DEFAULT_LIMITS,
    fetch_policy: FetchPolicy | None = None,
) -> dict[str, Any]:
    """Run one job. Never raises for job errors: they are returned as an error payload."""
    job_id = payload.get("id") if isinstance(payload, dict) else None
    job_id = job_id or wire.new_job_id()
    fmt = _audio_format(payload)
    started = time.perf_counter()
    try:
        request = parse(payload, limits, fetch_policy)
        if isinstance(request, SpeechRequest):
            audio = _checked_audio(engines.synthesize(request, cancel))
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
    fetch_policy: FetchPolicy | None = None,
) -> Iterator[dict[str, Any]]:
    """Speech as chunk payloads, each sent as soon as it is made, then an empty one with ``final: true``; an
    error ends the stream as an error payload."""
    job_id = (payload.get("id") if isinstance(payload, dict) else None) or wire.new_job_id()
    fmt = _audio_format(payload)
    try:
        request = parse(payload, limits, fetch_policy)
        if not isinstance(request, SpeechRequest):
            raise InvalidRequest("task", "only speech jobs stream")
        index, rate = 0, None
        for piece in engines.synthesize_stream(request, cancel):
            # each piece goes out the moment the engine makes it: none waits to learn whether it is the last
            yield wire.encode_chunk(job_id, index, piece, final=False, text=piece.text, audio_format=fmt)
            index, rate = index + 1, piece.sample_rate
        if rate is None:
            raise _nothing_spoken()
        # the end has a chunk of its own: final, no samples, no words (as WAV: an empty FLAC is no file)
        end = AudioChunk.end(index, rate)
        yield wire.encode_chunk(job_id, index, end.audio, final=True, text=end.text, audio_format="wav")
    except Exception as exc:
        if not isinstance(exc, InvalidRequest):
            log.exception("stream %s failed", job_id)
        yield wire.encode_error(job_id, exc)


async def ahandle(payload: Any, *, progress: ProgressFn | None = None, limits: Limits = DEFAULT_LIMITS,
                  fetch_policy: FetchPolicy | None = None) -> dict[str, Any]:
    """``handle`` off the event loop, for async handlers (RunPod, Modal, the HTTP worker)."""
    import asyncio

    cancel = threading.Event()
    try:
        return await asyncio.to_thread(handle, payload, progress=progress, cancel=cancel, limits=limits,
                                       fetch_policy=fetch_policy)
    finally:
        cancel.set()  # if we were cancelled, tell the engine thread to stop at its next check


async def ahandle_stream(payload: Any, *, limits: Limits = DEFAULT_LIMITS, fetch_policy: FetchPolicy | None = None
                         ) -> AsyncIterator[dict[str, Any]]:
    import asyncio

    cancel = threading.Event()
    iterator = handle_stream(payload, cancel=cancel, limits=limits, fetch_policy=fetch_policy)
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
