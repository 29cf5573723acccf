"""The `broker` command. Each group of commands lives in its own module and registers itself here."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="broker",
    help="Run speech and talking-head rendering on the cheapest healthy GPU provider.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# One module per concern; each exposes register(app).
_COMMAND_MODULES = (
    "broker.cli.generate",  # speak, render
    "broker.cli.providers",  # providers
    "broker.cli.money",  # quote, costs
    "broker.cli.deploy",  # deploy <provider>
    "broker.cli.emulate",  # emulate <provider>
    "broker.cli.workers",  # worker serve
    "broker.cli.bench",  # bench
    "broker.cli.serve",  # serve, serve keys
    "broker.cli.longform",  # jobs
)

for _name in _COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    app()
