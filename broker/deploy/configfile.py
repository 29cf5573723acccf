"""Write what a deploy created into the broker config, keeping the user's comments and layout."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.items import Table


def _table(doc: Any, section: str | Sequence[str]) -> Any:
    """The table at ``section`` ("runpod", or ("endpoints", "rp-cpu") for [endpoints.rp-cpu]), made if absent."""
    parts = [section] if isinstance(section, str) else list(section)
    node = doc
    for i, part in enumerate(parts):
        found = node.get(part)
        if found is None:
            # [endpoints] holds only sub-tables: a super table, so the file reads [endpoints.rp-cpu]
            found = tomlkit.table(is_super_table=i < len(parts) - 1)
            node[part] = found
        node = found
    return node


def update_section(path: Path, section: str | Sequence[str], values: Mapping[str, Any]) -> Path:
    """Set ``values`` under ``[section]`` in the TOML file at ``path`` (created if absent), atomically.

    Only the keys given change; comments, order and other sections stay as they were. Never pass
    secrets here: the config file is for names and addresses, credentials live in the environment.
    """
    path = path.expanduser()
    doc = tomlkit.parse(path.read_text()) if path.exists() else tomlkit.document()
    table = _table(doc, section)
    for key, value in values.items():
        if value is not None:
            table[key] = value
    return _write(path, doc)


def add_to_list(path: Path, key: Sequence[str], value: str, *, only_if_present: bool = False) -> Path:
    """Append ``value`` to the list at ``key`` (e.g. ("manager", "providers")) unless it is there already.

    ``only_if_present``: leave the file alone when the list is not set (an unset list may mean "all").
    """
    path = path.expanduser()
    if not path.exists():
        if only_if_present:
            return path
        doc = tomlkit.document()
    else:
        doc = tomlkit.parse(path.read_text())
    *parents, name = key
    holder: Any = doc
    for part in parents:
        found = holder.get(part)
        if not isinstance(found, Table | dict):
            if only_if_present:
                return path
            found = tomlkit.table()
            holder[part] = found
        holder = found
    current = holder.get(name)
    if current is None:
        if only_if_present:
            return path
        holder[name] = [value]
    elif value not in list(current):
        current.append(value)
    else:
        return path
    return _write(path, doc)


def _write(path: Path, doc: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(tomlkit.dumps(doc))
        if path.exists():  # keep the mode the user gave their config (mkstemp makes 0600)
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
