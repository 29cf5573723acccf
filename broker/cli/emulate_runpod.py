"""`broker emulate runpod`: a loopback RunPod endpoint with the real SDK worker behind it."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Annotated

import typer

from broker.cli.common import fail, out
from broker.cli.emulate import emulator_ledger


def say(line: str) -> None:
    out.print(line, highlight=False, markup=False, soft_wrap=True)


def emulate_runpod(
    port: Annotated[int, typer.Option("--port", "-p", help="Port on 127.0.0.1 (0 = any free one).")] = 8765,
    endpoint_id: Annotated[str | None, typer.Option("--endpoint-id", help="Endpoint id to serve.")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", help="Key callers must send (default: random).")] = None,
    mode: Annotated[str, typer.Option("--mode", help="Handler mode: stream | job.")] = "stream",
    worker: Annotated[bool, typer.Option("--worker/--no-worker",
                                         help="Start the runpod SDK worker (else run one yourself).")] = True,
    handler: Annotated[Path | None, typer.Option("--handler", help="handlers/runpod/handler.py to run.")] = None,
    worker_log: Annotated[Path | None, typer.Option("--worker-log", help="Where the worker's output goes.")] = None,
    cold_start: Annotated[float, typer.Option("--cold-start", help="Extra seconds before a worker gets jobs.")] = 0.0,
    failure_rate: Annotated[float, typer.Option("--failure-rate", help="Share of jobs that fail (0-1).")] = 0.0,
    stuck: Annotated[bool, typer.Option("--stuck", help="Never hand jobs to workers (queue stuck).")] = False,
    crash_rate: Annotated[float, typer.Option("--crash-rate", help="Share of jobs whose worker is killed.")] = 0.0,
    rate_limit: Annotated[int, typer.Option("--rate-limit", help="Answer the next N API calls with 429.")] = 0,
    retry_after: Annotated[float, typer.Option("--retry-after", help="Retry-After seconds on 429s.")] = 1.0,
    ttl: Annotated[float | None, typer.Option("--ttl", help="Override every job's ttl (seconds).")] = None,
    reject_auth: Annotated[bool, typer.Option("--reject-auth", help="Answer every API call with 401.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the failure and crash dice.")] = 0,
    workers: Annotated[int, typer.Option("--workers", "-w", min=1,
                                         help="Real SDK workers behind the endpoint (its workersMax).")] = 1,
    scale_from_zero: Annotated[bool, typer.Option(
        "--scale-from-zero", help="Start no worker; add one (cold) per waiting job, up to --workers.")] = False,
) -> None:
    """Serve RunPod's job API, worker queue and REST API on loopback; change faults at /_emulator/faults."""
    from broker.testing.runpod_emulator import RunPodEmulator
    from broker.testing.runpod_jobs import Faults

    if mode not in ("stream", "job"):
        fail("--mode must be stream or job", 2)
    faults = Faults(cold_start_s=cold_start, failure_rate=failure_rate, stuck=stuck, crash_rate=crash_rate,
                    rate_limit_burst=rate_limit, retry_after_s=retry_after, ttl_s=ttl, reject_auth=reject_auth)
    emulator = RunPodEmulator(port=port, endpoint_id=endpoint_id, api_key=api_key, worker=worker, mode=mode,
                              handler_path=handler, faults=faults, seed=seed, worker_log=worker_log,
                              workers_max=workers, scale_from_zero=scale_from_zero)
    # Ctrl-C and a supervisor's SIGTERM both stop it cleanly, even when started from a background shell
    # (which hands its children SIGINT ignored, so Python would never raise KeyboardInterrupt).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        emulator.start()
    except (OSError, FileNotFoundError) as exc:
        fail(f"could not start the RunPod emulator: {exc}")
    try:
        say(f"RunPod emulator on {emulator.root_url} (endpoint {emulator.endpoint_id})")
        say("Point broker at it (its jobs go to a ledger of their own, not yours):")
        exports = {**emulator.env(), "BROKER_LEDGER__PATH": str(emulator_ledger("runpod", emulator.port))}
        for key, value in exports.items():
            say(f"  export {key}={value}")
        if worker and scale_from_zero:
            say(f"Worker log: {emulator.worker_log}")
            say(f"No worker yet: up to {workers} start as jobs arrive, each with a cold start. Ctrl-C stops.")
        elif worker:
            say(f"Worker log: {emulator.worker_log}")
            seconds = emulator.wait_for_worker(timeout=600)
            say(f"{workers} worker(s) starting; the first was up after {seconds:.1f} s (import + engine load). "
                "Ctrl-C stops.")
        else:
            say("No worker started; run the image (or handler.py) with:")
            for key, value in emulator.worker_environment("my-worker").items():
                say(f"  {key}={value}")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    except (TimeoutError, RuntimeError) as exc:
        fail(str(exc))
    finally:
        emulator.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def register(app: typer.Typer) -> None:
    app.command("runpod")(emulate_runpod)
