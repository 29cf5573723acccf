"""The JSON job payload (version 1) that every adapter sends and every handler receives.

Job::

    {"v": 1, "id": "…", "task": "speech" | "render", "stream": false,
     "input": {"text": "…", "speaker": 0, "max_length_ms": null, "engine": null,
               "context": [{"speaker": 0, "text": "…", "audio": MEDIA}],
               # render only:
               "audio": MEDIA | null, "avatar": MEDIA | null, "avatar_preset": null,
               "mouth_box": [x, y, w, h] | null, "fps": 25, "size": 512},
     "output": {"audio_format": "flac"}}

Result::

    {"v": 1, "id": "…", "ok": true, "task": "speech",
     "audio": MEDIA, "seconds": 3.2, "phonemes": [["h", 0.0, 0.05], …],
     "metrics": {"load_s": 0.0, "run_s": 0.4, "device": "cpu"}}
    {"v": 1, "id": "…", "ok": true, "task": "render", "video": MEDIA,
     "frames": 80, "fps": 25, "width": 512, "height": 512, "seconds": 3.2, "metrics": {…}}
    {"v": 1, "id": "…", "ok": false, "error": {"type": "InvalidRequest", "field": "text", "message": "…"}}

Stream chunk (one per yielded item)::

    {"v": 1, "id": "…", "chunk": {"index": 0, "final": false, "text": "…", "audio": MEDIA}}

A broker worker sends each piece as it is made and ends with a chunk of its own: ``final: true``,
``text: ""`` and no samples (a WAV header), one index past the last piece. Readers also take a
``final`` piece that carries audio (a custom handler's last piece) as the end.

MEDIA is ``{"b64": "…", "mime": "audio/flac"}`` or ``{"url": "https://…", "mime": …}``.
Handlers that are given a URL fetch it themselves; adapters choose URL when the
provider's payload limit would be exceeded.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from typing import Any

from broker.errors import BrokerError, InvalidRequest, error_from_dict
from broker.media import Audio, PhonemeTiming, Video
from broker.types import DEFAULT_LIMITS, Limits, RenderRequest, Segment, SpeechRequest, build

WIRE_VERSION = 1

_AUDIO_MIME = {"wav": "audio/wav", "flac": "audio/flac"}


def new_job_id() -> str:
    return uuid.uuid4().hex


# -- media --------------------------------------------------------------------
def encode_media(data: bytes, mime: str) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode("ascii"), "mime": mime}


def decode_media(media: Any, field: str, *, fetch: Any = None) -> bytes:
    """Bytes of a MEDIA object. ``fetch(url) -> bytes`` is used for URLs (the worker passes one)."""
    if not isinstance(media, dict):
        raise InvalidRequest(field, "must be an object with 'b64' or 'url'")
    if "b64" in media:
        try:
            return base64.b64decode(media["b64"], validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise InvalidRequest(field, "is not valid base64") from None
    if "url" in media:
        url = str(media["url"])
        if not url.startswith(("http://", "https://", "data:")):
            raise InvalidRequest(field, "url must be http(s) or a data: URL")
        if url.startswith("data:"):
            _, _, payload = url.partition(",")
            try:
                return base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidRequest(field, "data URL is not valid base64") from None
        if fetch is None:
            raise InvalidRequest(field, "URL inputs are not accepted here")
        try:
            data: bytes = fetch(url)
        except InvalidRequest as exc:  # the fetcher knows the URL, not which field named it
            raise InvalidRequest(field, exc.reason) from None
        return data
    raise InvalidRequest(field, "must have 'b64' or 'url'")


def encode_audio(audio: Audio, fmt: str = "flac") -> dict[str, str]:
    return encode_media(audio.to_bytes(fmt), _AUDIO_MIME[fmt])


def decode_audio(media: Any, field: str, *, fetch: Any = None) -> Audio:
    data = decode_media(media, field, fetch=fetch)
    try:
        return Audio.from_bytes(data)
    except ValueError as exc:
        raise InvalidRequest(field, str(exc)) from None


# -- jobs ---------------------------------------------------------------------
def encode_request(
    request: SpeechRequest | RenderRequest,
    *,
    job_id: str | None = None,
    stream: bool = False,
    audio_format: str = "flac",
) -> dict[str, Any]:
    """The v1 job payload for ``request``. Audio travels as lossless FLAC by default."""
    inp: dict[str, Any]
    if isinstance(request, SpeechRequest):
        inp = {
            "text": request.text,
            "speaker": request.speaker,
            "max_length_ms": request.max_length_ms,
            "engine": request.engine,
            "temperature": request.temperature,
            "topk": request.topk,
            "context": [
                {"speaker": s.speaker, "text": s.text, "audio": encode_audio(s.audio, audio_format)}
                for s in request.context
            ],
        }
    else:
        inp = {
            "text": request.text,
            "speaker": request.speaker,
            "engine": request.engine,
            "audio": encode_audio(request.audio, audio_format) if request.audio is not None else None,
            "avatar": encode_media(request.avatar, "image/*") if request.avatar is not None else None,
            "avatar_preset": request.avatar_preset,
            "mouth_box": list(request.mouth_box) if request.mouth_box else None,
            "fps": request.fps,
            "size": request.size,
        }
    return {
        "v": WIRE_VERSION,
        "id": job_id or new_job_id(),
        "task": request.task,
        "stream": bool(stream),
        "input": inp,
        "output": {"audio_format": audio_format},
    }


#: the shape of a job, quoted by errors about a body that is not one
JOB_SHAPE = ('{"v": 1, "task": "speech", "input": {"text": "Hello.", "speaker": 0}} '
             '(or "task": "render" with "input": {"text": ...} or {"audio": MEDIA})')


def decode_request(payload: Any, *, fetch: Any = None, limits: Limits = DEFAULT_LIMITS
                   ) -> SpeechRequest | RenderRequest:
    """Validate a job payload into a request. Raises ``InvalidRequest`` naming the field.

    Counts are checked against ``limits`` before any media is decoded or fetched."""
    if isinstance(payload, dict) and "v" not in payload and "task" not in payload and "input" not in payload:
        # A bare request ({"text": ...}): say what a job looks like instead of "unsupported version None".
        raise InvalidRequest("payload", f"is not a wire job; send {JOB_SHAPE}")
    if not isinstance(payload, dict):
        raise InvalidRequest("payload", "must be a JSON object")
    version = payload.get("v")
    if version != WIRE_VERSION:
        raise InvalidRequest("v", f"unsupported wire version {version!r}; this worker speaks {WIRE_VERSION}")
    task = payload.get("task")
    inp = payload.get("input")
    if not isinstance(inp, dict):
        raise InvalidRequest("input", "must be a JSON object")
    if task == "speech":
        fields = {k: inp[k] for k in ("text", "speaker", "max_length_ms", "engine", "temperature", "topk")
                  if inp.get(k) is not None}
        if "text" not in fields:
            raise InvalidRequest("input.text", "is required")
        build(SpeechRequest, **fields)  # every cheap field is checked before any media is decoded or fetched
        context = []
        raw_context = inp.get("context") or []
        if not isinstance(raw_context, list):
            raise InvalidRequest("input.context", "must be a list")
        if len(raw_context) > limits.max_context_segments:
            raise InvalidRequest(
                "input.context", f"{len(raw_context)} segments is over the limit of {limits.max_context_segments}"
            )
        for i, seg in enumerate(raw_context):
            if not isinstance(seg, dict):
                raise InvalidRequest(f"input.context.{i}", "must be an object")
            audio = decode_audio(seg.get("audio"), f"input.context.{i}.audio", fetch=fetch)
            context.append(
                build(Segment, speaker=seg.get("speaker", 0), text=seg.get("text", ""), audio=audio)
            )
        return build(SpeechRequest, context=context, **fields)  # type: ignore[no-any-return]
    if task == "render":
        fields = {k: inp[k] for k in ("text", "speaker", "engine", "avatar_preset", "fps", "size")
                  if inp.get(k) is not None}
        if inp.get("mouth_box") is not None:
            box = inp["mouth_box"]
            if not isinstance(box, list | tuple) or len(box) != 4:
                raise InvalidRequest("input.mouth_box", "must be [x, y, w, h]")
            fields["mouth_box"] = tuple(box)  # the model checks each is a whole number
        if (inp.get("audio") is None) == (inp.get("text") is None):
            raise InvalidRequest("input", "give exactly one of audio or text")
        # Every cheap field is checked before any media is decoded or fetched.
        build(RenderRequest, **{**fields, "text": fields.get("text", "check")})
        if inp.get("audio") is not None:
            fields["audio"] = decode_audio(inp["audio"], "input.audio", fetch=fetch)
        if inp.get("avatar") is not None:
            fields["avatar"] = decode_media(inp["avatar"], "input.avatar", fetch=fetch)
        return build(RenderRequest, **fields)  # type: ignore[no-any-return]
    raise InvalidRequest("task", f"must be 'speech' or 'render', got {task!r}")


# -- results ------------------------------------------------------------------
def encode_speech_result(
    job_id: str, audio: Audio, *, audio_format: str = "flac", metrics: dict[str, Any] | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "v": WIRE_VERSION,
        "id": job_id,
        "ok": True,
        "task": "speech",
        "audio": encode_audio(audio, audio_format),
        "seconds": audio.duration_s,
        "metrics": metrics or {},
    }
    if audio.phonemes is not None:
        out["phonemes"] = [[p.phoneme, round(p.start_s, 4), round(p.end_s, 4)] for p in audio.phonemes]
    return out


def encode_render_result(job_id: str, video: Video, *, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "v": WIRE_VERSION,
        "id": job_id,
        "ok": True,
        "task": "render",
        "video": encode_media(video.data, video.mime),
        "frames": video.frames,
        "fps": video.fps,
        "width": video.width,
        "height": video.height,
        "seconds": video.audio_seconds,
        "metrics": metrics or {},
    }


def encode_error(job_id: str | None, error: BaseException) -> dict[str, Any]:
    if isinstance(error, BrokerError):
        err = error.to_dict()
    else:
        # An unexpected exception inside the worker: report its class, never its locals.
        err = {"type": "JobFailed", "code": "job_failed", "message": f"{type(error).__name__}: {error}"}
    return {"v": WIRE_VERSION, "id": job_id, "ok": False, "error": err}


def encode_chunk(job_id: str, index: int, audio: Audio, *, final: bool, text: str | None = None,
                 audio_format: str = "flac") -> dict[str, Any]:
    return {
        "v": WIRE_VERSION,
        "id": job_id,
        "chunk": {"index": index, "final": final, "text": text, "audio": encode_audio(audio, audio_format)},
    }


def decode_result(payload: Any, *, provider: str | None = None, fetch: Any = None) -> Audio | Video:
    """Turn a result payload back into ``Audio``/``Video``; an error payload raises its typed error."""
    if not isinstance(payload, dict):
        raise error_from_dict({"type": "BadOutput", "message": "result is not a JSON object"}, provider=provider)
    if payload.get("ok") is False or ("error" in payload and payload.get("ok") is not True):
        err = payload.get("error")
        raise error_from_dict(err if isinstance(err, dict) else {"message": str(err)}, provider=provider)
    task = payload.get("task")
    try:
        if task == "speech":
            audio = decode_audio(payload["audio"], "audio", fetch=fetch)
            if payload.get("phonemes"):
                audio.phonemes = [PhonemeTiming(str(p), float(s), float(e)) for p, s, e in payload["phonemes"]]
            return audio
        if task == "render":
            return Video(
                data=decode_media(payload["video"], "video", fetch=fetch),
                fps=float(payload["fps"]),
                frames=int(payload["frames"]),
                width=int(payload["width"]),
                height=int(payload["height"]),
                audio_seconds=float(payload.get("seconds", 0.0)),
            )
    except (KeyError, TypeError, ValueError, InvalidRequest) as exc:
        raise error_from_dict(
            {"type": "BadOutput", "message": f"malformed result payload: {exc}"}, provider=provider
        ) from None
    raise error_from_dict({"type": "BadOutput", "message": f"result has unknown task {task!r}"}, provider=provider)


def decode_chunk(payload: Any, *, provider: str | None = None) -> tuple[int, bool, Audio, str | None]:
    if isinstance(payload, dict) and payload.get("ok") is False:
        raise error_from_dict(payload.get("error") or {}, provider=provider)
    try:
        chunk = payload["chunk"]
        return int(chunk["index"]), bool(chunk["final"]), decode_audio(chunk["audio"], "chunk.audio"), chunk.get("text")
    except (KeyError, TypeError, InvalidRequest) as exc:
        raise error_from_dict(
            {"type": "BadOutput", "message": f"malformed stream chunk: {exc}"}, provider=provider
        ) from None
