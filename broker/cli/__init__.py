"""The `broker` command. Each group of commands lives in its own module and registers itself here."""

from __future__ import annotations

import importlib
import os
import sqlite3
import sys

# This process is ours: skip pydantic's scan of every installed package's entry points for plugins
# (~60 ms of start-up, before any model can be built). A caller who wants its plugins sets the variable.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

import typer
from rich.markup import escape

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
    "broker.cli.reconcile",  # reconcile
    "broker.cli.serve",  # serve, serve keys
    "broker.cli.longform",  # jobs
)

for _name in _COMMAND_MODULES:
    importlib.import_module(_name).register(app)


@app.callback()
def _preflight(ctx: typer.Context) -> None:
    """Run speech and talking-head rendering on the cheapest healthy GPU provider."""
    if "--help" in sys.argv[1:] or ctx.resilient_parsing:
        return  # help needs no configuration
    from broker.cli.common import preflight

    preflight(ctx.invoked_subcommand)


def main() -> None:
    """The console script: nothing escapes as a traceback, whichever command raised it."""
    from pydantic import ValidationError

    from broker.cli.common import EXIT_BAD_INPUT, EXIT_FAILED, err, one_line
    from broker.errors import BrokerError, ConfigurationError, InvalidRequest

    try:
        app()
    except (InvalidRequest, ConfigurationError) as exc:
        err.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_BAD_INPUT)
    except BrokerError as exc:
        err.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_FAILED)
    except ValidationError as exc:
        err.print(f"[bold red]error:[/] invalid configuration: {escape(one_line(exc))}", highlight=False,
                  soft_wrap=True)
        sys.exit(EXIT_BAD_INPUT)
    except sqlite3.DatabaseError as exc:
        err.print(f"[bold red]error:[/] the ledger cannot be read: {escape(str(exc))}", highlight=False,
                  soft_wrap=True)
        sys.exit(EXIT_BAD_INPUT)
