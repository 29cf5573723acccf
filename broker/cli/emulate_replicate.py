"""`broker emulate replicate`: Replicate's hosted API on loopback, in front of a real Cog runtime."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from broker.cli.common import EXIT_BAD_INPUT, fail, out


def emulate_replicate(
    port: Annotated[int, typer.Option("--port", help="Port for the /v1 API on 127.0.0.1 (0 = any free one).")] = 8000,
    token: Annotated[str, typer.Option("--token", envvar="REPLICATE_API_TOKEN", show_envvar=False,
                                       help="The API token clients must send (default: $REPLICATE_API_TOKEN).")]
    = "r8_emulator_token",
    model: Annotated[str, typer.Option("--model", help="owner/name of the model the runtime serves.")]
    = "broker/broker",
    cog_url: Annotated[str | None, typer.Option("--cog-url", help="Use a Cog runtime already running here "
                                                 "instead of starting one.")] = None,
    handler_dir: Annotated[Path | None, typer.Option("--handler-dir", help="The Cog model folder "
                                                      "(default: handlers/replicate of this checkout).")] = None,
    fail_rate: Annotated[float, typer.Option("--fail-rate", min=0.0, max=1.0,
                                             help="Fraction of predictions that fail.")] = 0.0,
    stuck: Annotated[bool, typer.Option("--stuck", help="Predictions stay `starting` forever.")] = False,
    rate_limit: Annotated[int, typer.Option("--rate-limit", min=0,
                                            help="Answer the next N prediction creates with 429.")] = 0,
    retry_after: Annotated[int, typer.Option("--retry-after", min=0, help="Retry-After seconds on 429s.")] = 1,
    setup_delay: Annotated[float, typer.Option("--setup-delay", min=0.0,
                                               help="Seconds the first prediction waits for a cold boot.")] = 0.0,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for --fail-rate.")] = None,
) -> None:
    """Serve Replicate's /v1 API (predictions, streams, files, deployments) for offline testing.

    Point a client at it with base URL http://127.0.0.1:PORT (the `replicate` client) or
    http://127.0.0.1:PORT/v1 (BROKER_REPLICATE__BASE_URL). Faults can also be changed while it
    runs: POST /_emulator/faults with JSON such as {"outage": true}.
    """
    try:
        from broker.testing.cog_runtime import HANDLER_DIR, CogRuntime
        from broker.testing.replicate_emulator import EmulatorServer, ReplicateEmulator
        from broker.testing.replicate_state import Faults
    except ImportError as exc:
        fail(f"the emulator needs {exc.name}: pip install 'broker[worker,replicate]'", EXIT_BAD_INPUT)
    owner, _, name = model.partition("/")
    if not owner or not name:
        fail(f"--model must be owner/name, got {model!r}", EXIT_BAD_INPUT)
    faults = Faults(fail_rate=fail_rate, stuck=stuck, rate_limit_burst=rate_limit, retry_after_s=retry_after,
                    setup_delay_s=setup_delay)
    runtime = None
    if cog_url is None:
        out.print("starting the Cog runtime (python -m cog.server.http) ...", highlight=False)
        try:
            runtime = CogRuntime(handler_dir or HANDLER_DIR).start()
        except Exception as exc:  # a missing handler, a failed setup: one clear line
            fail(f"the Cog runtime did not start: {exc}")
        cog_url = runtime.url
    emulator = ReplicateEmulator(cog_url, token=token, owner=owner, model=name, faults=faults, seed=seed)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        try:
            server_cm = EmulatorServer(emulator, port=port)
        except OSError as exc:
            fail(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}", EXIT_BAD_INPUT)
        with server_cm as server:
            out.print(f"Replicate emulator on {server.url} (API base {server.url}/v1), model {model}, "
                      f"Cog runtime {cog_url}", highlight=False, soft_wrap=True)
            out.print("press Ctrl-C to stop", highlight=False)
            try:
                while not stop.wait(0.5):
                    pass
            except KeyboardInterrupt:
                pass
    finally:
        if runtime is not None:
            runtime.stop()


def register(app: typer.Typer) -> None:
    app.command("replicate")(emulate_replicate)
