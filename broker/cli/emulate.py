"""`broker emulate <provider>`: loopback emulators of provider APIs, for offline testing."""

from __future__ import annotations

import importlib
from pathlib import Path

import typer

emulate_app = typer.Typer(help="Run a loopback emulator of a provider's API.", no_args_is_help=True)

_PROVIDER_MODULES = ("broker.cli.emulate_runpod", "broker.cli.emulate_replicate")


def register(app: typer.Typer) -> None:
    for name in _PROVIDER_MODULES:
        importlib.import_module(name).register(emulate_app)
    app.add_typer(emulate_app, name="emulate")


def emulator_ledger(kind: str, port: int) -> Path:
    """The ledger an emulator's export lines point broker at, emptied as the emulator starts.

    Jobs run against an emulator are not spending: they must not land in the user's own ledger, count
    against its budgets, or leave errors that `broker providers` keeps replaying after the emulator is
    gone. Each emulator session gets a fresh ledger of its own in the temporary directory.
    """
    import tempfile

    path = Path(tempfile.gettempdir()) / "broker-emulated" / f"{kind}-{port}.sqlite"
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        leftover.unlink(missing_ok=True)
    return path
