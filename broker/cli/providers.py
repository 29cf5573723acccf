"""`broker providers`: every endpoint, whether the manager routes to it (and why not), and how it has behaved.

Circuit state, last error and job latency come from the ledger (the memory every process shares):
the last day of attempts is replayed through a fresh circuit breaker with the configured thresholds.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from broker.cli.common import guarded, out, print_json
from broker.errors import BrokerError
from broker.providers import registry


def _history(settings: Any) -> dict[str, dict[str, Any]]:
    """Circuit state, last error and latency per endpoint, replayed from the ledger's last day.

    On a shared (PostgreSQL) store the fleet's live circuit and cooldown state is laid over the replay."""
    from broker.routing.health import BreakerConfig, state_from_history
    from broker.store import open_shared_health, open_store

    ms = settings.manager
    try:
        ledger = open_store(settings)
    except BrokerError:
        return {}
    try:
        rows = ledger.attempts(since=time.time() - 86400)
    finally:
        ledger.close()
    by_provider: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_provider.setdefault(r["provider"], []).append(r)
    config = BreakerConfig(ms.breaker_failures, ms.breaker_ejection_s, ms.breaker_max_ejection_s)
    history = {name: state_from_history(rs, config) for name, rs in by_provider.items()}
    try:
        shared = open_shared_health(settings)
    except BrokerError:
        shared = None
    if shared is not None:
        now = time.time()
        try:
            for event in shared.current():
                seen = history.setdefault(event.endpoint, {"state": "closed", "consecutive_failures": 0,
                                                           "last_error": None, "latency_p50_s": None})
                if event.kind == "opened" and event.until is not None:
                    seen["state"] = "open" if event.until > now else "half-open"
                elif event.kind == "cooldown" and event.until is not None and event.until > now:
                    seen["cooling_for_s"] = round(event.until - now, 3)
        finally:
            shared.close()
    return history


def _description(kind: str) -> str:
    try:
        return registry.entry(kind).description
    except BrokerError:
        return "unknown kind"


def _describe(status: Any, probe: bool, history: dict[str, dict[str, Any]]) -> dict[str, Any]:
    provider = status.provider
    row: dict[str, Any] = {
        "provider": status.name, "kind": status.kind, "description": _description(status.kind),
        "routed": status.routed, "role": status.role, "reason": status.reason, "region": status.region,
        "installed": status.reason != "not installed", "configured": provider is not None,
    }
    seen = history.get(status.name)
    if seen:
        row.update(circuit=seen["state"], last_error=seen["last_error"], latency_p50_s=seen["latency_p50_s"])
        if seen.get("cooling_for_s"):
            row["cooling_for_s"] = seen["cooling_for_s"]  # a 429's Retry-After, shared by the fleet
    if provider is None:
        state = "not installed" if status.reason == "not installed" else "not configured"
        if status.reason in ("off", "disabled (local.enabled = false)"):
            state = "off"
        row.update(state=state, detail=status.detail)
        return row
    row["hardware"] = provider.capabilities.hardware
    row["max_concurrency"] = provider.max_concurrency
    if probe:
        report = asyncio.run(_health(provider))
        row.update(state="healthy" if report.ok else "unhealthy", detail=report.detail, latency_s=report.latency_s)
    else:
        row.update(state="configured", detail=status.detail if not status.routed else "")
    return row


async def _health(provider: Any) -> Any:
    try:
        return await asyncio.wait_for(provider.health(), 30)
    finally:
        await provider.aclose()


def _routed_cell(r: dict[str, Any]) -> str:
    if r["routed"]:
        return f"yes ({r['role']})" if r["kind"] == "local" else "yes"  # local's place: fallback or ranked
    return f"no: {r['reason']}" if r["reason"] else "no"


def providers(
    probe: Annotated[bool, typer.Option("--probe/--no-probe", help="Call each endpoint's health probe.")] = True,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List endpoints: routed or why not, configured, healthy."""

    def run() -> None:
        from broker.providers import endpoints
        from broker.settings import Settings

        settings = Settings()
        history = _history(settings)
        rows = [_describe(s, probe, history) for s in endpoints.resolve(settings).rows]
        if as_json:
            print_json(rows)
            return
        table = Table("endpoint", "kind", "routed", "state", "circuit", "hardware", "region", "probe", "job p50",
                      "last error / detail")
        for r in rows:
            lat, p50 = r.get("latency_s"), r.get("latency_p50_s")
            cells = [r["provider"], r["kind"], _routed_cell(r), r.get("state", ""), r.get("circuit", "-"),
                     r.get("hardware", ""), r.get("region") or "", f"{lat * 1000:.0f} ms" if lat else "",
                     f"{p50:.2f} s" if p50 else "", r.get("last_error") or r.get("detail", "")]
            table.add_row(*(escape(str(c)) for c in cells))  # "[runpod] endpoint_id" must print as written
        out.print(table)

    guarded(run, as_json=as_json)


def register(app: typer.Typer) -> None:
    app.command("providers")(providers)
