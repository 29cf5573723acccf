"""RunPod serverless handler: a shim over ``broker.worker`` (all the logic lives in the package).

Engines load at import, so only a worker's cold start pays for them. Two modes, chosen by
``BROKER_RUNPOD_MODE`` (the SDK fixes the mode when it starts):

- ``stream`` (default): a generator handler started with ``return_aggregate_stream``. Streamed speech
  jobs yield audio chunks to ``/stream``; every other job yields its one result.
- ``job``: a plain async handler; results are not copied to ``/stream`` (lighter for renders).

Errors travel as a JSON string in ``error`` (the SDK's own server breaks on anything but a string);
the adapter parses it back into the typed error.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import runpod

from broker import engines, worker
from broker.errors import EngineUnavailable
from broker.settings import Settings

log = logging.getLogger("broker.handler.runpod")

# Empty build args arrive as empty variables; an empty voice path means "the packaged voice".
for _name in [n for n, v in os.environ.items() if n.startswith("BROKER_") and v == ""]:
    del os.environ[_name]

_settings = Settings()
engines.configure(_settings.engines, _settings.local.device)
try:
    engines.preload((_settings.engines.default,), render_engine=os.environ.get("BROKER_PRELOAD_RENDER", "1") != "0")
except EngineUnavailable as exc:
    # Keep the worker up: its jobs report the typed error and the broker fails over elsewhere.
    log.error("engine preload failed: %s", exc.message)

#: least time between two progress updates of one render (each is an HTTP post)
PROGRESS_INTERVAL_S = 0.5


def _for_runpod(result: dict[str, Any]) -> dict[str, Any]:
    if result.get("ok") is False:
        return {"error": json.dumps(result.get("error") or {"message": "worker error"})}
    return result


def _progress(job: dict[str, Any]) -> Callable[[float], None]:
    last = [0.0, -1.0]  # time sent, fraction sent

    def report(fraction: float) -> None:
        now = time.monotonic()
        if fraction < 1.0 and (now - last[0] < PROGRESS_INTERVAL_S or fraction - last[1] < 0.05):
            return
        last[:] = [now, fraction]
        runpod.serverless.progress_update(job, {"progress": round(float(fraction), 3)})

    return report


async def handler(job: dict[str, Any]) -> dict[str, Any]:
    """``job`` mode: one job in, one wire result out."""
    return _for_runpod(await worker.ahandle(job["input"], progress=_progress(job)))


async def stream_handler(job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """``stream`` mode: chunks for streamed speech, else the one result."""
    payload = job["input"]
    if isinstance(payload, dict) and payload.get("stream") and payload.get("task") == "speech":
        async for item in worker.ahandle_stream(payload):
            yield _for_runpod(item)
    else:
        yield _for_runpod(await worker.ahandle(payload, progress=_progress(job)))


if __name__ == "__main__":
    # The SDK's one-shot local test (`python handler.py`, reading test_input.json) runs plain handlers only.
    local_test = "RUNPOD_WEBHOOK_GET_JOB" not in os.environ and "--rp_serve_api" not in sys.argv
    if local_test or os.environ.get("BROKER_RUNPOD_MODE", "stream") == "job":
        runpod.serverless.start({"handler": handler})
    else:
        runpod.serverless.start({"handler": stream_handler, "return_aggregate_stream": True})
