"""Shared CLI plumbing: one-line errors with exit code 2 for bad input, atomic output files."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from broker.errors import AllProvidersFailed, BrokerError, ConfigurationError, InvalidRequest, ProviderNotInstalled

T = TypeVar("T")

out = Console()
err = Console(stderr=True)

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def guarded(fn: Callable[[], T], *, as_json: bool = False) -> T:
    """Run ``fn``; typed errors become one line on stderr (exit 2 for bad input), never a traceback.

    ``as_json``: the command was asked for ``--json``, so stdout also gets one JSON object for the
    error (``{"ok": false, "error": {"type", "message", "field", ...}, "exit_code"}``): a script reading
    stdout learns what went wrong without parsing stderr.
    """
    try:
        return fn()
    except InvalidRequest as exc:
        _failed(exc, exc.message, EXIT_BAD_INPUT, as_json)
    except (ConfigurationError, ProviderNotInstalled) as exc:
        _failed(exc, exc.message, EXIT_BAD_INPUT, as_json)
    except AllProvidersFailed as exc:
        _failed(exc, exc.message, EXIT_FAILED, as_json)
    except BrokerError as exc:
        _failed(exc, f"{type(exc).__name__}: {exc.message}", EXIT_FAILED, as_json)
    except KeyboardInterrupt as exc:
        _failed(exc, "interrupted", 130, as_json)


def _failed(exc: BaseException, message: str, code: int, as_json: bool) -> NoReturn:
    if as_json:
        error = exc.to_dict() if isinstance(exc, BrokerError) else {"type": type(exc).__name__, "message": message}
        print_json({"ok": False, "error": error, "exit_code": code})
    fail(message, code)


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = path.expanduser()
    if path.parent and not path.parent.exists():
        raise InvalidRequest("output", f"directory {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes the file 0600; an output file should get the usual mode (0666 less the umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def interactive() -> bool:
    return err.is_terminal
