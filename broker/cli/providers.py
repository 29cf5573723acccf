"""`broker providers`: what is installed, configured and healthy."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer
from rich.table import Table

from broker.cli.common import guarded, out, print_json
from broker.errors import BrokerError
from broker.providers import registry


def _describe(name: str, probe: bool) -> dict[str, Any]:
    from broker.settings import Settings

    row: dict[str, Any] = {"provider": name, "description": registry.entry(name).description}
    try:
        registry.provider_class(name)
        row["installed"] = True
    except BrokerError as exc:
        row.update(installed=False, configured=False, state="not installed", detail=exc.message)
        return row
    try:
        provider = registry.create(name, Settings())
        row["configured"] = True
    except BrokerError as exc:
        row.update(configured=False, state="not configured", detail=exc.message)
        return row
    row["hardware"] = provider.capabilities.hardware
    if probe:
        report = asyncio.run(_health(provider))
        row.update(state="healthy" if report.ok else "unhealthy", detail=report.detail,
                   latency_s=report.latency_s)
    else:
        row.update(state="configured", detail="")
    return row


async def _health(provider: Any) -> Any:
    try:
        return await asyncio.wait_for(provider.health(), 30)
    finally:
        await provider.aclose()


def providers(
    probe: Annotated[bool, typer.Option("--probe/--no-probe", help="Call each provider's health probe.")] = True,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List providers: installed, configured, healthy."""

    def run() -> None:
        rows = [_describe(n, probe) for n in registry.names()]
        if as_json:
            print_json(rows)
            return
        table = Table("provider", "state", "hardware", "latency", "detail")
        for r in rows:
            lat = r.get("latency_s")
            table.add_row(r["provider"], r.get("state", ""), r.get("hardware", ""),
                          f"{lat * 1000:.0f} ms" if lat else "", r.get("detail", ""))
        out.print(table)

    guarded(run)


def register(app: typer.Typer) -> None:
    app.command("providers")(providers)
