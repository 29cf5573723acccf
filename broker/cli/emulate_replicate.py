"""Filled in by its provider's issue."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    return None
