"""The records the Replicate emulator keeps: predictions (with their SSE event log), files, faults.

Shapes follow Replicate's HTTP API (https://replicate.com/docs/reference/http, read
2026-11-23) as the official ``replicate`` client 1.0.7 parses them: a prediction has
``id, model, version, input, output, logs, error, status, metrics, created_at,
started_at, completed_at, urls{get, cancel, stream}``; stream events are ``output``,
``logs``, ``error`` and ``done``, each with an ``id:`` line (the client drops events
without one).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

TERMINAL = ("succeeded", "failed", "canceled")

#: hardware SKUs the emulator accepts (names from https://replicate.com/pricing, 2026-11-23)
HARDWARE = (
    {"name": "CPU", "sku": "cpu"},
    {"name": "Nvidia T4 GPU", "sku": "gpu-t4"},
    {"name": "Nvidia L40S GPU", "sku": "gpu-l40s"},
    {"name": "2x Nvidia L40S GPU", "sku": "gpu-2x-l40s"},
    {"name": "Nvidia A100 (80GB) GPU", "sku": "gpu-a100-large"},
    {"name": "Nvidia H100 GPU", "sku": "gpu-h100"},
)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def problem(status: int, detail: str, title: str | None = None) -> dict[str, Any]:
    """An RFC 7807 body, as Replicate answers errors (``replicate.exceptions.ReplicateError``)."""
    return {"title": title or detail, "detail": detail, "status": status}


@dataclass
class Faults:
    """Knobs that make the emulator misbehave the way a real provider does. Change them at any time."""

    #: fraction of predictions that fail (the worker crashed) without running
    fail_rate: float = 0.0
    #: predictions stay ``starting`` forever: no worker ever picks them up
    stuck: bool = False
    #: the next N prediction creates answer 429 with ``Retry-After``
    rate_limit_burst: int = 0
    retry_after_s: int = 1
    #: a cold boot: the next prediction waits this long in ``starting`` (once per setting)
    setup_delay_s: float = 0.0
    #: every ``/v1`` call answers 503
    outage: bool = False

    def update(self, **changes: Any) -> None:
        for key, value in changes.items():
            if not hasattr(self, key):
                raise KeyError(f"unknown fault {key!r}")
            setattr(self, key, type(getattr(self, key))(value))


@dataclass
class PredictionRecord:
    id: str
    model: str
    version: str
    input: dict[str, Any]
    deployment: str | None = None
    status: str = "starting"
    output: list[Any] | None = None
    error: str | None = None
    logs: str = ""
    predict_time: float | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    completed_at: float | None = None
    #: sent to the Cog runtime (a slot is held until it reports a terminal state)
    forwarded: bool = False
    #: how many of the runtime's outputs have been turned into delivery URLs
    outputs_seen: int = 0
    events: list[tuple[str, str]] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def changed(self) -> asyncio.Event:
        """An event set at the next change (grab it, then check state, then wait)."""
        return self._changed

    def emit(self, event: str, data: str) -> None:
        self.events.append((event, data))
        self._touch()

    def _touch(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def start(self) -> None:
        if self.status == "starting":
            self.status = "processing"
            self.started_at = time.time()
            self._touch()

    def add_output(self, value: Any) -> None:
        self.output = [*(self.output or []), value]
        self.emit("output", value if isinstance(value, str) else json.dumps(value))

    def add_logs(self, text: str) -> None:
        if text:
            self.logs += text
            self.emit("logs", text)

    def finish(self, status: str, *, error: str | None = None, predict_time: float | None = None) -> None:
        if self.terminal:
            return
        self.status = status
        self.error = error
        self.completed_at = time.time()
        if predict_time is not None:
            self.predict_time = predict_time
        if status == "failed":
            self.emit("error", json.dumps({"detail": error or "prediction failed"}))
            self.emit("done", json.dumps({"reason": "error"}))
        elif status == "canceled":
            self.emit("done", json.dumps({"reason": "canceled"}))
        else:
            self.emit("done", "{}")
        self.done.set()

    def sse(self, index: int) -> str:
        """Event ``index`` in wire format; ids are ``<created>:<n>`` like the hosted stream."""
        event, data = self.events[index]
        lines = [f"event: {event}", f"id: {int(self.created_at)}:{index}"]
        lines += [f"data: {line}" for line in data.split("\n")]
        return "\n".join(lines) + "\n\n"

    def to_json(self, base_url: str) -> dict[str, Any]:
        metrics: dict[str, float] = {}
        if self.predict_time is not None:
            metrics["predict_time"] = round(self.predict_time, 6)
        if self.completed_at is not None:
            metrics["total_time"] = round(self.completed_at - self.created_at, 6)
        out: dict[str, Any] = {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "input": self.input,
            "logs": self.logs,
            "output": self.output,
            "data_removed": False,
            "error": self.error,
            "status": self.status,
            "source": "api",
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "completed_at": iso(self.completed_at),
            "metrics": metrics,
            "urls": {
                "get": f"{base_url}/v1/predictions/{self.id}",
                "cancel": f"{base_url}/v1/predictions/{self.id}/cancel",
                "stream": f"{base_url}/stream/{self.id}",
            },
        }
        if self.deployment:
            out["deployment"] = self.deployment
        return out


@dataclass
class FileRecord:
    id: str
    name: str
    content_type: str
    data: bytes
    metadata: dict[str, Any]
    created_at: float = field(default_factory=time.time)
    #: uploaded files live a day on Replicate
    ttl_s: float = 24 * 3600

    def to_json(self, base_url: str) -> dict[str, Any]:
        import hashlib

        return {
            "id": self.id,
            "name": self.name,
            "content_type": self.content_type,
            "size": len(self.data),
            "etag": hashlib.md5(self.data, usedforsecurity=False).hexdigest(),
            "checksums": {"sha256": hashlib.sha256(self.data).hexdigest()},
            "metadata": self.metadata,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.created_at + self.ttl_s),
            "urls": {"get": f"{base_url}/v1/files/{self.id}"},
        }


@dataclass
class Delivery:
    """An output file, kept for an hour like ``replicate.delivery`` keeps API outputs."""

    data: bytes
    mime: str
    expires_at: float


def version_json(version_id: str, schema: dict[str, Any] | None, created_at: float) -> dict[str, Any]:
    return {"id": version_id, "created_at": iso(created_at), "cog_version": "0.23.1", "openapi_schema": schema or {}}


def model_json(owner: str, name: str, model: dict[str, Any]) -> dict[str, Any]:
    latest = model["versions"][-1] if model["versions"] else None
    return {
        "url": f"https://replicate.com/{owner}/{name}",
        "owner": owner,
        "name": name,
        "description": model.get("description"),
        "visibility": model.get("visibility", "private"),
        "github_url": None,
        "paper_url": None,
        "license_url": None,
        "run_count": model.get("run_count", 0),
        "cover_image_url": None,
        "default_example": None,
        "latest_version": latest,
    }


def deployment_json(owner: str, name: str, dep: dict[str, Any]) -> dict[str, Any]:
    return {
        "owner": owner,
        "name": name,
        "current_release": {
            "number": dep["number"],
            "model": dep["model"],
            "version": dep["version"],
            "created_at": iso(dep["created_at"]),
            "created_by": {"type": "user", "username": owner, "name": owner, "github_url": None},
            "configuration": {
                "hardware": dep["hardware"],
                "min_instances": dep["min_instances"],
                "max_instances": dep["max_instances"],
            },
        },
    }
