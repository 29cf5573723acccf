"""Reading broker.toml and spotting keys that are not settings (a typo is silently ignored otherwise).

``read_toml`` turns a malformed file into a ``ConfigurationError`` naming the file and line.
``unknown_keys`` walks a TOML table or the ``BROKER_*`` variables against the settings models and
names, for each key that is not a setting, the nearest one that is (``difflib``).
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from broker.errors import ConfigurationError

ENV_PREFIX = "BROKER_"
#: BROKER_* variables that are not settings keys (credentials, and the handlers' own switches)
NOT_SETTINGS = frozenset({"BROKER_CONFIG", "BROKER_WORKER_API_KEY"})


def read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read the configuration {path}: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path} is not valid TOML: {exc}") from None


def _section_model(model: type[BaseModel], name: str) -> type[BaseModel] | None:
    """The model of field ``name`` when it is a nested settings section (else None: a value or a free table)."""
    annotation = model.model_fields[name].annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _suggest(word: str, choices: list[str]) -> str | None:
    found = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_keys(model: type[BaseModel], table: Mapping[str, Any], where: str = "") -> Iterator[tuple[str, str | None]]:
    """(dotted key, nearest valid dotted key or None) for every key of ``table`` that ``model`` lacks."""
    fields = list(model.model_fields)
    for key, value in table.items():
        dotted = f"{where}{key}"
        if key not in model.model_fields:
            near = _suggest(key, fields)
            yield dotted, f"{where}{near}" if near else None
            continue
        section = _section_model(model, key)
        if section is not None and isinstance(value, Mapping):
            yield from unknown_keys(section, value, f"{dotted}.")


def unknown_env(model: type[BaseModel], environ: Mapping[str, str]) -> Iterator[tuple[str, str | None]]:
    """The same for ``BROKER_SECTION__KEY`` variables (names without ``__`` are the handlers' own)."""
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or var in NOT_SETTINGS or "__" not in var:
            continue
        parts = var[len(ENV_PREFIX):].lower().split("__")
        current: type[BaseModel] | None = model
        spelled: list[str] = []
        for i, part in enumerate(parts):
            if current is None:
                break  # inside a free-form table (a dict setting): any key goes
            if part not in current.model_fields:
                near = _suggest(part, list(current.model_fields))
                shown = ENV_PREFIX + "__".join([*spelled, near, *parts[i + 1:]]).upper() if near else None
                yield var, shown
                break
            spelled.append(part)
            current = _section_model(current, part)


def config_warnings(model: type[BaseModel], path: Path | None, environ: Mapping[str, str]) -> list[str]:
    """One line per key that no setting reads, with the nearest valid name."""
    lines = []
    if path is not None and path.is_file():
        for key, near in unknown_keys(model, read_toml(path)):
            hint = f"; did you mean {near!r}?" if near else ""
            lines.append(f"{path}: unknown key {key!r} is ignored{hint}")
    for var, near in unknown_env(model, environ):
        hint = f"; did you mean {near}?" if near else ""
        lines.append(f"unknown setting {var} is ignored{hint}")
    return lines
