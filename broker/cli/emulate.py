"""`broker emulate <provider>`: loopback emulators of provider APIs, for offline testing."""

from __future__ import annotations

import importlib

import typer

emulate_app = typer.Typer(help="Run a loopback emulator of a provider's API.", no_args_is_help=True)

_PROVIDER_MODULES = ("broker.cli.emulate_runpod", "broker.cli.emulate_replicate")


def register(app: typer.Typer) -> None:
    for name in _PROVIDER_MODULES:
        importlib.import_module(name).register(emulate_app)
    app.add_typer(emulate_app, name="emulate")
