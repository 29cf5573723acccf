"""Shared CLI plumbing: one-line errors with exit code 2 for bad input, atomic output files."""

from __future__ import annotations

import json
import os
import stat
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
        from broker.cli.signals import EXIT_TERMINATED, Terminated
        from broker.store import flush_all

        flush_all()  # attempts settled while stopping reach the file before we exit
        if isinstance(exc, Terminated):
            _failed(exc, "stopped (SIGTERM); running provider jobs were cancelled", EXIT_TERMINATED, as_json)
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
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent or ".")
    except OSError as exc:  # read-only, /proc, no permission: before any work is done
        raise InvalidRequest("output", f"cannot write in {path.parent}: {exc.strerror}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes the file 0600; an output file should get the usual mode (0666 less the umask).
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp_path, 0o666 & ~umask)
    except OSError:
        pass  # some filesystems keep their own modes
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


# -- input and output paths: checked before any provider is called ---------------------------------
MiB = 1024 * 1024
#: the largest audio file `broker render --audio` reads (10 min of 96 kHz 32-bit stereo WAV is ~440 MiB)
MAX_AUDIO_FILE_BYTES = 512 * MiB


def check_output(path: Path, **inputs: Path | None) -> Path:
    """Refuse an output that cannot be written, or that would overwrite one of the ``inputs``."""
    path = path.expanduser()
    if path.is_dir():
        raise InvalidRequest("output", f"{path} is a directory; name a file in it")
    parent = path.parent
    if not parent.exists():
        raise InvalidRequest("output", f"directory {parent} does not exist")
    if not parent.is_dir():
        raise InvalidRequest("output", f"{parent} is not a directory")
    for name, source in inputs.items():
        if source is not None and _same_file(path, source.expanduser()):
            raise InvalidRequest("output", f"{path} is also the --{name} input; write the result elsewhere")
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def read_input(path: Path, field: str, max_bytes: int) -> bytes:
    """The bytes of a regular file no larger than ``max_bytes``, checked before reading (no /dev/zero)."""
    path = path.expanduser()
    try:
        info = path.stat()
    except OSError as exc:
        raise InvalidRequest(field, f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise InvalidRequest(field, f"{path} is not a regular file")
    if info.st_size > max_bytes:
        raise InvalidRequest(
            field, f"{path} is {info.st_size / MiB:.1f} MiB, over the limit of {max_bytes / MiB:g} MiB")
    try:
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise InvalidRequest(field, f"cannot read {path}: {exc.strerror}") from None
    if len(data) > max_bytes:  # it grew while we looked
        raise InvalidRequest(field, f"{path} is over the limit of {max_bytes / MiB:g} MiB")
    return data


def positive(option: str, value: float | None, *, allow_zero: bool = False) -> None:
    """A negative (or zero) count of seconds or days is a typo, not a request."""
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise InvalidRequest(option, f"must be {'zero or more' if allow_zero else 'a positive number'}, got {value:g}")


def check_engine(engine: str | None) -> None:
    """An engine name this broker knows (exit 2 listing them), before any provider is asked."""
    if engine is None:
        return
    known = _engine_names()
    if engine not in known:
        raise InvalidRequest("engine", f"unknown engine {engine!r}; choose one of {', '.join(known)}")


def _engine_names() -> tuple[str, ...]:
    """Every engine this broker knows by name: built-ins and plugins (entry points, engines.plugins)."""
    from broker.engines import registry
    from broker.settings import Settings

    return tuple(registry.names(Settings().engines))


# -- configuration, checked once before any command runs ------------------------------------------
#: commands that create the configuration file BROKER_CONFIG names (so it may not exist yet)
_WRITES_CONFIG = frozenset({"deploy"})


def preflight(command: str | None) -> None:
    """Configuration problems are one line and exit 2 before the command starts; unknown keys warn."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from broker.config_check import config_warnings
    from broker.settings import Settings, config_path

    named = os.environ.get("BROKER_CONFIG")
    path = config_path()
    if named and not path.is_file() and command not in _WRITES_CONFIG:
        fail(f"BROKER_CONFIG names {path}, which {'is not a file' if path.exists() else 'does not exist'}",
             EXIT_BAD_INPUT)
    try:
        for line in config_warnings(Settings, path, os.environ):
            err.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)
        Settings()
    except BrokerError as exc:
        fail(exc.message, EXIT_BAD_INPUT)
    except ValidationError as exc:
        fail(f"invalid configuration: {one_line(exc)}", EXIT_BAD_INPUT)
    except (SettingsError, ValueError) as exc:  # a value pydantic-settings could not even parse
        fail(f"invalid configuration: {_unparsable(exc)}", EXIT_BAD_INPUT)


def _unparsable(exc: Exception) -> str:
    """pydantic-settings names only the section (``field "runpod"``): name the variables that feed it."""
    import re

    cause = f": {exc.__cause__}" if exc.__cause__ is not None else ""
    found = re.search(r'field "(\w+)"', str(exc))
    if found:
        prefix = f"BROKER_{found.group(1).upper()}__"
        names = sorted(v for v in os.environ if v.startswith(prefix))
        if names:
            return f"cannot parse {' or '.join(names)} (a list or table is JSON, e.g. [\"piper\"]){cause}"
    return f"{one_line(exc)}{cause}"


def one_line(exc: Exception) -> str:
    """A pydantic error as one line naming the key (``manager.breaker_failures: ...``)."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    shown = first.get("input")
    got = f" (got {shown!r})" if isinstance(shown, str | int | float) else ""
    more = f" and {exc.error_count() - 1} more" if exc.error_count() > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{got}{more}"
