"""A gateway on loopback with scripted fake providers (shared by the gateway tests and the replica script)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request

from broker.gateway.outputs import DirectoryOutputs
from broker.gateway.server import build_app
from broker.money.ledger import Ledger
from broker.routing.manager import CloudGPUManager
from broker.settings import Settings
from broker.testing.fake import FakeProvider, fake_catalog


def fake_manager(tmp: Path, *providers: FakeProvider, ledger_path: str | None = None) -> CloudGPUManager:
    settings = Settings(ledger={"path": ledger_path or str(tmp / "ledger.sqlite")},
                        manager={"fallback_local": False})
    provs = list(providers) or [FakeProvider("fast", usd_per_second=0.001)]
    return CloudGPUManager(provs, settings=settings, catalog=fake_catalog(*provs),
                           ledger=Ledger(ledger_path or str(tmp / "ledger.sqlite")))


def gateway_app(tmp: Path, manager: CloudGPUManager, *, db_url: str | None = None,
                queue_options: dict[str, Any] | None = None, outputs: Path | None = None, **gateway: Any) -> Any:
    """``outputs``: the output folder (default ``tmp/outputs``); replicas share one, as they share a bucket."""
    settings = Settings(ledger={"path": str(tmp / "ledger.sqlite")}, gateway={"lease_s": 3.0, **gateway})
    return build_app(settings, manager, db_url=db_url or f"sqlite:///{tmp / 'gateway.sqlite'}",
                     outputs=DirectoryOutputs(outputs or tmp / "outputs"), host="127.0.0.1",
                     queue_options=queue_options)


def wait_state(client: httpx.Client, job_id: str, states: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
               timeout: float = 30.0, headers: dict[str, str] | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        view = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if view.get("state") in states:
            return view  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {view.get('state')} after {timeout} s")
        time.sleep(0.05)


SPEECH = {"kind": "speech", "input": {"text": "Chapter one. It was a bright cold day in April.", "speaker": 0}}


class WebhookReceiver:
    """An app (``app``) that answers POST /hook and keeps each delivery as (headers, body) in arrival order
    (``received``); ``got`` is set when the first arrives."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.got = threading.Event()
        self.app = FastAPI()

        @self.app.post("/hook")
        async def _hook(request: Request) -> dict[str, Any]:
            self.received.append((dict(request.headers), await request.body()))
            self.got.set()
            return {"ok": True}
