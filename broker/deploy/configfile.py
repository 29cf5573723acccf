"""Write what a deploy created into the broker config, keeping the user's comments and layout."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomlkit


def update_section(path: Path, section: str, values: Mapping[str, Any]) -> Path:
    """Set ``values`` under ``[section]`` in the TOML file at ``path`` (created if absent), atomically.

    Only the keys given change; comments, order and other sections stay as they were. Never pass
    secrets here: the config file is for names and addresses, credentials live in the environment.
    """
    path = path.expanduser()
    doc = tomlkit.parse(path.read_text()) if path.exists() else tomlkit.document()
    table = doc.get(section)
    if table is None:
        table = tomlkit.table()
        doc[section] = table
    for key, value in values.items():
        if value is not None:
            table[key] = value
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
