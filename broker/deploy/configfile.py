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


def deploy_settings(settings: Any, kind: str, label: str, endpoint: str | None, fresh: Mapping[str, Any]) -> Any:
    """What a `broker deploy KIND [--name NAME]` deploys from: the [KIND] section (no name, or the kind's own),
    ``[endpoints.NAME]`` when it exists (it must be of this kind; ``label`` names the kind in the error), else a
    new endpoint: the section's deploy defaults with ``fresh`` over them (what must not carry over from the
    section's own endpoint: its id, app or deployment)."""
    from broker.errors import ConfigurationError
    from broker.providers.endpoints import norm

    section = getattr(settings, kind)
    if endpoint is None or endpoint == kind:
        return section
    for found, cfg in settings.endpoints.items():
        if norm(found) == norm(endpoint):
            if cfg.kind != kind:
                raise ConfigurationError(f"[endpoints.{found}] is a {cfg.kind} endpoint, not a {label} one")
            return cfg
    return section.model_copy(update=dict(fresh))


def record_endpoint(path: Path, kind: str, endpoint: str | None, values: Mapping[str, Any],
                    named: Mapping[str, Any] | None = None) -> Path:
    """Record a deploy: ``values`` in [KIND] (no name, or the kind's own), else in ``[endpoints.NAME]`` with its
    kind and ``named`` (what routing needs to know of it), and the name added to ``manager.providers`` when the
    file lists them, so the new endpoint is routed."""
    if endpoint is None or endpoint == kind:
        return update_section(path, kind, values)
    update_section(path, ("endpoints", endpoint), {"kind": kind, **values, **(named or {})})
    return add_to_list(path, ("manager", "providers"), endpoint, only_if_present=True)
