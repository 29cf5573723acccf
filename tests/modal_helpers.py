"""Shared by the Modal tests: load handlers/modal/app.py, and a stand-in for Modal's servers.

Modal has no local server to test against, so the SDK path is exercised through the provider's
``lookup=`` seam with ``InProcessModal``: every "spawn" runs the app's own class method with
``.local()`` (the same code a Modal container runs) in a thread, and ids, polling, expiry and
cancellation behave as ``SDKCalls`` reports them from the real SDK.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

from broker.errors import JobLost

ROOT = Path(__file__).resolve().parent.parent
APP_FILE = ROOT / "handlers" / "modal" / "app.py"


def load_modal_app(name: str = "broker_modal_app") -> ModuleType:
    """Import handlers/modal/app.py by path (it is a script for `modal deploy`, not a package module)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, APP_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class InProcessModal:
    """``ModalCalls`` backed by a real in-process run of the app's ``BrokerWorker`` class."""

    def __init__(self, worker: Any) -> None:
        #: an instance of the app's class (``BrokerWorker()``); its @modal.enter hooks run on first use
        self.obj = worker
        self.tasks: dict[str, asyncio.Future[Any]] = {}
        self.spawned: list[tuple[str, dict[str, Any]]] = []
        self.cancelled: list[str] = []
        self.expired: set[str] = set()

    async def spawn(self, method: str, payload: dict[str, Any]) -> str:
        call_id = f"fc-{uuid.uuid4().hex[:16]}"
        self.spawned.append((method, payload))
        self.tasks[call_id] = asyncio.ensure_future(asyncio.to_thread(getattr(self.obj, method).local, payload))
        return call_id

    async def poll(self, call_id: str) -> dict[str, Any] | None:
        if call_id in self.expired:
            raise JobLost(f"Modal get {call_id}: the result expired", provider="modal")
        task = self.tasks[call_id]
        if not task.done():
            return None
        result: dict[str, Any] = task.result()
        return result

    async def cancel(self, call_id: str) -> None:
        self.cancelled.append(call_id)

    async def stream(self, method: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        self.spawned.append((method, payload))
        iterator = iter(getattr(self.obj, method).local(payload))
        sentinel = object()
        while (item := await asyncio.to_thread(next, iterator, sentinel)) is not sentinel:
            yield item

    async def describe(self) -> dict[str, Any]:
        return {"app": "in-process", "class": type(self.obj).__name__}
