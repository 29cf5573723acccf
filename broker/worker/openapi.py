"""The worker's OpenAPI document (``GET /openapi.json``): the wire job bodies, with examples.

Written by hand from ``broker.wire`` because the routes read raw bodies (so that a body is read only
once the job holds a slot); the bounds come from the worker's own ``Limits`` so the document says
what this worker accepts. ``tests/test_worker_fuzz.py`` runs schemathesis against it.
"""

from __future__ import annotations

from typing import Any

from broker.types import MAX_FPS, MIN_FPS, MIN_LENGTH_MS, Limits
from broker.wire import WIRE_VERSION

#: a short FLAC file would be long to show; examples use text, which every worker can speak
SPEECH_EXAMPLE: dict[str, Any] = {
    "v": WIRE_VERSION, "id": "job-1", "task": "speech", "stream": False,
    "input": {"text": "Hello from broker.", "speaker": 0},
    "output": {"audio_format": "flac"},
}
RENDER_EXAMPLE: dict[str, Any] = {
    "v": WIRE_VERSION, "id": "job-2", "task": "render",
    "input": {"text": "Hi there!", "fps": 25, "size": 256},
}


def _media(mime_hint: str) -> dict[str, Any]:
    return {
        "description": f"Inline base64 or a URL the worker fetches (https, public addresses by default); {mime_hint}",
        "oneOf": [
            {"type": "object", "required": ["b64"], "additionalProperties": False,
             "properties": {"b64": {"type": "string", "format": "byte"}, "mime": {"type": "string"}}},
            {"type": "object", "required": ["url"], "additionalProperties": False,
             "properties": {"url": {"type": "string", "format": "uri"}, "mime": {"type": "string"}}},
        ],
    }


def _schemas(limits: Limits) -> dict[str, Any]:
    speaker = {"description": "speaker id (>= 0) or voice name",
               "oneOf": [{"type": "integer", "minimum": 0}, {"type": "string", "minLength": 1, "maxLength": 200}]}
    text = {"type": "string", "minLength": 1, "maxLength": limits.max_text_chars,
            "description": "what to say: at least one letter or digit, valid UTF-8, no control characters"}
    engine = {"type": ["string", "null"], "maxLength": 100, "description": "null = the worker's default engine"}
    output = {"type": "object", "properties": {"audio_format": {"type": "string", "enum": ["flac", "wav"]}}}
    common = {"v": {"type": "integer", "enum": [WIRE_VERSION]}, "id": {"type": "string", "maxLength": 200},
              "stream": {"type": "boolean"}, "output": output}
    return {
        "AudioMedia": _media("audio: FLAC or WAV"),
        "ImageMedia": _media("image: PNG, JPEG, WebP, GIF or BMP"),
        "Segment": {
            "type": "object", "required": ["text", "audio"],
            "properties": {"speaker": {"type": "integer", "minimum": 0}, "text": {"type": "string"},
                           "audio": {"$ref": "#/components/schemas/AudioMedia"}},
        },
        "SpeechInput": {
            "type": "object", "required": ["text"],
            "properties": {
                "text": text, "speaker": speaker, "engine": engine,
                "max_length_ms": {"type": ["number", "null"], "minimum": MIN_LENGTH_MS,
                                  "maximum": limits.max_length_ms},
                "temperature": {"type": "number", "minimum": 0, "maximum": 2},
                "topk": {"type": "integer", "minimum": 1, "maximum": 10_000},
                "context": {"type": "array", "maxItems": limits.max_context_segments,
                            "items": {"$ref": "#/components/schemas/Segment"}},
            },
        },
        "RenderInput": {
            "type": "object", "description": "exactly one of text or audio",
            "properties": {
                "text": text, "speaker": speaker, "engine": engine,
                "audio": {"$ref": "#/components/schemas/AudioMedia"},
                "avatar": {"$ref": "#/components/schemas/ImageMedia"},
                "avatar_preset": {"type": ["string", "null"], "maxLength": 200},
                "mouth_box": {"type": ["array", "null"], "minItems": 4, "maxItems": 4,
                              "items": {"type": "integer", "minimum": 0}, "description": "[x, y, w, h]"},
                "fps": {"type": "number", "minimum": MIN_FPS, "maximum": MAX_FPS},
                "size": {"type": "integer", "minimum": 64, "maximum": 2048, "multipleOf": 2},
            },
        },
        "SpeechJob": {
            "type": "object", "required": ["v", "task", "input"],
            "properties": {**common, "task": {"type": "string", "enum": ["speech"]},
                           "input": {"$ref": "#/components/schemas/SpeechInput"}},
        },
        "RenderJob": {
            "type": "object", "required": ["v", "task", "input"],
            "properties": {**common, "task": {"type": "string", "enum": ["render"]},
                           "input": {"$ref": "#/components/schemas/RenderInput"}},
        },
        "Job": {"oneOf": [{"$ref": "#/components/schemas/SpeechJob"}, {"$ref": "#/components/schemas/RenderJob"}]},
        "Error": {
            "type": "object", "required": ["ok", "error"],
            "properties": {
                "v": {"type": "integer"}, "id": {"type": ["string", "null"]}, "ok": {"type": "boolean"},
                "error": {"type": "object", "required": ["type", "message"],
                          "properties": {"type": {"type": "string"}, "code": {"type": "string"},
                                         "message": {"type": "string"}, "field": {"type": "string"}}},
            },
        },
        "Result": {"type": "object", "required": ["ok"], "description": "see broker/wire.py for every field"},
    }


def _errors(*statuses: int) -> dict[str, Any]:
    why = {400: "not JSON, or nested too deep", 401: "missing or wrong API key", 413: "body over the limit",
           422: "invalid request (the error names the field)", 503: "not ready or busy (Retry-After)"}
    return {str(s): {"description": why[s], "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}} for s in statuses}


def _job_operation(summary: str, ok: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": summary,
        "security": [{"bearer": []}, {"apiKey": []}],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Job"},
            "examples": {"speech": {"summary": "speak a sentence", "value": SPEECH_EXAMPLE},
                         "render": {"summary": "a talking-head video of a sentence", "value": RENDER_EXAMPLE}},
        }}},
        "responses": {"200": ok, **_errors(400, 401, 413, 422, 503)},
    }


def openapi_document(limits: Limits) -> dict[str, Any]:
    result = {"application/json": {"schema": {"$ref": "#/components/schemas/Result"}}}
    chunks = {"application/x-ndjson": {"schema": {"type": "string"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "broker worker", "version": str(WIRE_VERSION),
                 "description": "Wire jobs (broker/wire.py, version 1) in, result payloads out."},
        "paths": {
            "/run": {"post": _job_operation("Run one job; answers its result payload",
                                            {"description": "the result", "content": result})},
            "/stream": {"post": _job_operation("Run one speech job; answers one JSON chunk per line",
                                               {"description": "chunks as made, then an empty one, final: true",
                                                "content": chunks})},
        },
        "components": {
            "schemas": _schemas(limits),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
        },
    }
