"""The `broker` command. Each group of commands lives in its own module and registers itself here."""

from __future__ import annotations

import gc
import importlib
import os
import sqlite3
import sys

# This process is ours: skip pydantic's scan of every installed package's entry points for plugins
# (~60 ms of start-up, before any model can be built). A caller who wants its plugins sets the variable.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

import typer
from rich.markup import escape

# One module per concern; each exposes register(app). The command names each one adds:
_COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "broker.cli.generate": ("speak", "render"),
    "broker.cli.providers": ("providers",),
    "broker.cli.money": ("quote", "costs"),
    "broker.cli.deploy": ("deploy",),
    "broker.cli.emulate": ("emulate",),
    "broker.cli.workers": ("worker",),
    "broker.cli.bench": ("bench",),
    "broker.cli.reconcile": ("reconcile",),
    "broker.cli.serve": ("serve",),
    "broker.cli.longform": ("jobs",),
}


def build_app(command: str | None = None) -> typer.Typer:
    """The `broker` app with every command, or only the module that holds ``command``.

    The console script builds only what it runs: Typer reads every command's signature and type hints
    when it starts (~70 ms for all of them here), and each module imports its own dependencies."""
    modules = [m for m, names in _COMMAND_MODULES.items() if command in names] or list(_COMMAND_MODULES)
    built = typer.Typer(
        name="broker",
        help="Run speech and talking-head rendering on the cheapest healthy GPU provider.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    built.callback()(_preflight)
    for name in modules:
        importlib.import_module(name).register(built)
    return built


def _preflight(ctx: typer.Context) -> None:
    """Run speech and talking-head rendering on the cheapest healthy GPU provider."""
    _start_collecting()
    if "--help" in sys.argv[1:] or ctx.resilient_parsing:
        return  # help needs no configuration
    from broker.cli.common import preflight

    preflight(ctx.invoked_subcommand)


def _start_collecting() -> None:
    """The command is about to run: what start-up built lives to the end, so move it out of the collector's
    sight (``gc.freeze``) and collect from here on only what the command itself allocates."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def main() -> None:
    """The console script: nothing escapes as a traceback, whichever command raised it."""
    # Start-up (the command's module, pydantic's schemas, numpy, Typer's command tree) allocates ~10^5
    # objects that all live until exit; the cyclic collector walked them over and over, ~90 ms of a
    # `broker speak "Hi."` on a 2-core box (gc.callbacks). No collection until the command starts.
    gc.disable()
    try:
        _main()
    finally:
        _start_collecting()


def _main() -> None:
    from pydantic import ValidationError

    from broker.cli.common import EXIT_BAD_INPUT, EXIT_FAILED, err, one_line
    from broker.errors import BrokerError, ConfigurationError, InvalidRequest

    args = sys.argv[1:]
    # the command is the first argument (the app has no options of its own); help lists every command
    command = args[0] if args and not args[0].startswith("-") and "--help" not in args else None
    try:
        build_app(command)()
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


_FULL: list[typer.Typer] = []


def __getattr__(name: str) -> typer.Typer:
    """``broker.cli.app``: every command (tests and tools drive it; built on first use)."""
    if name == "app":
        if not _FULL:
            _FULL.append(build_app())
        return _FULL[0]
    raise AttributeError(f"module 'broker.cli' has no attribute {name!r}")
