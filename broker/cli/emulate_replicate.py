"""`broker emulate replicate`: Replicate's hosted API on loopback, in front of a real Cog runtime."""

from __future__ import annotations

import secrets
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from broker.cli.common import EXIT_BAD_INPUT, fail, out
from broker.cli.emulate import emulator_ledger


def emulate_replicate(
    port: Annotated[int, typer.Option("--port", help="Port for the /v1 API on 127.0.0.1 (0 = any free one).")] = 8000,
    token: Annotated[str | None, typer.Option("--token", envvar="REPLICATE_API_TOKEN", show_envvar=False,
                                              help="The API token clients must send (default: "
                                              "$REPLICATE_API_TOKEN, else a random one that is printed).")]
    = None,
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

    It prints the export lines that point broker at it (base URL http://127.0.0.1:PORT/v1, the
    model, a ledger of its own); the `replicate` client takes base URL http://127.0.0.1:PORT. Faults
    can also be changed while it runs: POST /_emulator/faults with JSON such as {"outage": true}.
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
    # A token the user gave (or has in $REPLICATE_API_TOKEN) may be real: it is never printed.
    token_given = token is not None
    token = token or "r8_emulated_" + secrets.token_hex(12)
    faults = Faults(fail_rate=fail_rate, stuck=stuck, rate_limit_burst=rate_limit, retry_after_s=retry_after,
                    setup_delay_s=setup_delay)
    runtime = None
    if cog_url is None:
        _say("starting the Cog runtime (python -m cog.server.http) ...")
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
            _say(f"Replicate emulator on {server.url} (API base {server.url}/v1), model {model}, "
                 f"Cog runtime {cog_url}")
            _say("Point broker at it (its jobs go to a ledger of their own, not yours):")
            exports = {"BROKER_REPLICATE__BASE_URL": f"{server.url}/v1", "BROKER_REPLICATE__MODEL": model}
            if not token_given:
                exports["REPLICATE_API_TOKEN"] = token
            exports["BROKER_LEDGER__PATH"] = str(emulator_ledger("replicate", server.port))
            for key, value in exports.items():
                _say(f"  export {key}={value}")
            if token_given:
                _say("  # REPLICATE_API_TOKEN: the token you gave (--token or $REPLICATE_API_TOKEN)")
            _say("press Ctrl-C to stop")
            try:
                while not stop.wait(0.5):
                    pass
            except KeyboardInterrupt:
                pass
    finally:
        if runtime is not None:
            runtime.stop()


def _say(line: str) -> None:
    out.print(line, highlight=False, markup=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("replicate")(emulate_replicate)
