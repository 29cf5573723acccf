"""`broker worker serve`: run the self-hosted worker (the HTTP job API) on this machine's GPU or CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from broker.cli.common import EXIT_BAD_INPUT, err, fail

worker_app = typer.Typer(help="The self-hosted worker: serve jobs over HTTP from this machine.",
                         no_args_is_help=True)

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@worker_app.command("serve")
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to bind (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535)] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="BROKER_WORKER_API_KEY", show_envvar=True,
                     help="Require this key (Authorization: Bearer KEY or X-API-Key: KEY). "
                          "Prefer the environment variable: arguments show in `ps`."),
    ] = None,
    avatars: Annotated[
        Path | None, typer.Option("--avatars", help="Folder of portraits served as avatar presets (by file name).")
    ] = None,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", min=0.001, help="Largest request body.")] = 64.0,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="Jobs that run at once.")] = 1,
    max_waiting: Annotated[int, typer.Option("--max-waiting", min=0, help="Jobs that may wait for a slot.")] = 32,
    preload_render: Annotated[bool, typer.Option("--preload-render/--lazy-render",
                                                 help="Load the render engine before /ready turns 200, or on "
                                                      "the first render job (a speech-only fleet starts faster).")
                              ] = True,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Serve /health, /ready, /run and /stream until interrupted."""
    try:
        import uvicorn

        from broker.worker.server import MiB, WorkerOptions, create_app
    except ImportError as exc:
        fail(f"the worker needs {exc.name}: pip install 'broker[worker]'", EXIT_BAD_INPUT)
    from pydantic import SecretStr

    from broker import engines
    from broker.settings import Settings

    if avatars is not None and not avatars.is_dir():
        fail(f"--avatars: {avatars} is not a directory", EXIT_BAD_INPUT)
    if api_key is not None and not api_key.strip():
        fail("--api-key is empty", EXIT_BAD_INPUT)
    if api_key is None and host not in _LOOPBACK:
        err.print(f"[yellow]warning:[/] serving on {escape(host)} without an API key: anyone who can reach it "
                  "can run jobs", highlight=False, soft_wrap=True)

    settings = Settings()
    engines.configure(settings.engines, settings.local.device)
    options = WorkerOptions(
        api_key=SecretStr(api_key) if api_key else None,
        max_body_bytes=int(max_body_mb * MiB),
        avatars_dir=avatars,
        concurrency=concurrency,
        max_waiting=max_waiting,
        preload=(settings.engines.default,),
        preload_render=preload_render,
        limits=settings.limits,
    )
    uvicorn.run(create_app(options), host=host, port=port, log_level=log_level)


def register(app: typer.Typer) -> None:
    app.add_typer(worker_app, name="worker")
