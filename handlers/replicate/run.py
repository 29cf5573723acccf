"""Replicate (Cog) runner: a thin shim over ``broker.worker``.

Cog 0.23 models are a ``BaseRunner`` with ``run`` (``predict`` is the deprecated
name). ``run`` takes the v1 wire job as JSON text plus the files the job refers to,
and yields files: Replicate stores each one and hands back a URL, so a large video
never inflates the prediction object that clients poll.

* ``job``: the wire job. MEDIA objects may be ``{"file": i, "mime": ...}``, meaning the
  i-th entry of ``files``; Cog downloads those (URLs, data URLs, Replicate file-API URLs)
  before ``run`` is called.
* ``text`` (+ ``speaker``): for the Replicate web form; yields the spoken FLAC itself.

Yields ``result.json`` (a whole job), ``chunk-<n>.json`` per piece (``"stream": true``
speech jobs), or an error payload; job errors are payloads, never exceptions, so
every provider reports them the same way.
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path as LocalPath
from typing import Any

from cog import BaseRunner, Input, Path, streaming


class Runner(BaseRunner):
    def setup(self) -> None:
        from broker import engines

        # Load the engines now so the cold start pays once, not the first job.
        engines.preload()
        self._out = LocalPath(tempfile.mkdtemp(prefix="broker-out-"))
        self._count = 0

    @streaming
    def run(
        self,
        job: str = Input(description="A broker wire job (v1 JSON). Leave empty to use `text`.", default=""),
        files: list[Path] | None = Input(description="Files the job refers to as {\"file\": i}.", default=None),
        text: str | None = Input(description="Text to speak (when no job is given).", default=None),
        speaker: int = Input(description="Speaker id for `text`.", default=0, ge=0),
    ) -> Iterator[Path]:
        from broker import wire
        from broker.worker import handle, handle_stream

        # Runs are sequential (concurrency 1) and Cog has uploaded the previous run's
        # files before this one starts, so they can go.
        shutil.rmtree(self._out, ignore_errors=True)
        self._out.mkdir()
        if not job.strip():
            yield from self._speak(text, speaker)
            return
        cancel = threading.Event()
        try:
            payload = _resolve_files(json.loads(job), list(files or []))
        except (ValueError, IndexError, OSError) as exc:
            yield self._write("result.json", wire.encode_error(None, _invalid("job", str(exc))))
            return
        try:
            if isinstance(payload, dict) and payload.get("stream") and payload.get("task") == "speech":
                for i, chunk in enumerate(handle_stream(payload, cancel=cancel)):
                    yield self._write(f"chunk-{i}.json", chunk)
            else:
                yield self._write("result.json", handle(payload, cancel=cancel))
        finally:
            cancel.set()  # a cancelled prediction stops the engine at its next check

    def _speak(self, text: str | None, speaker: int) -> Iterator[Path]:
        from broker import wire
        from broker.types import SpeechRequest, build
        from broker.worker import handle

        if not text or not text.strip():
            yield self._write("result.json", wire.encode_error(None, _invalid("text", "give `job` or `text`")))
            return
        from broker.errors import BrokerError

        try:
            result = handle(wire.encode_request(build(SpeechRequest, text=text, speaker=speaker)))
        except BrokerError as exc:
            result = wire.encode_error(None, exc)
        if not result.get("ok"):
            yield self._write("result.json", result)
            return
        yield self._write_bytes("speech.flac", base64.b64decode(result["audio"]["b64"]))

    def _write(self, name: str, payload: dict[str, Any]) -> Path:
        return self._write_bytes(name, json.dumps(payload, separators=(",", ":")).encode())

    def _write_bytes(self, name: str, data: bytes) -> Path:
        # A fresh directory per file: Cog names the output after the file, and two
        # predictions must never share one.
        self._count += 1
        folder = self._out / str(self._count)
        folder.mkdir()
        path = folder / name
        path.write_bytes(data)
        return Path(path)


def _invalid(field: str, message: str) -> Exception:
    from broker.errors import InvalidRequest

    return InvalidRequest(field, message)


def _resolve_files(payload: Any, files: list[Any]) -> Any:
    """Replace ``{"file": i}`` MEDIA objects with the bytes of the i-th downloaded file."""
    if isinstance(payload, list):
        return [_resolve_files(item, files) for item in payload]
    if not isinstance(payload, dict):
        return payload
    if set(payload) <= {"file", "mime"} and isinstance(payload.get("file"), int):
        index = payload["file"]
        if not 0 <= index < len(files):
            raise IndexError(f"refers to file {index} but {len(files)} were given")
        data = LocalPath(str(files[index])).read_bytes()
        return {"b64": base64.b64encode(data).decode("ascii"), "mime": payload.get("mime", "")}
    return {key: _resolve_files(value, files) for key, value in payload.items()}
