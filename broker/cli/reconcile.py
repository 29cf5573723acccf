"""`broker reconcile`: settle the ledger rows a dead broker process left open.

A process killed with -9 (or lost with its host) cannot cancel its provider jobs or settle their rows.
Every command that opens the manager does this in the background; this command does it now and says
what it found: each open attempt whose owner is gone is looked up at its provider, cancelled if it
still runs, and settled at what the provider's metrics say it cost, releasing its reservation.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from broker.cli.common import out, print_json
from broker.cli.signals import run_job_command


def reconcile(
    stale_s: Annotated[float, typer.Option("--stale-s", min=1.0, help="Count an owner on another host as dead "
                                           "after this many seconds without a heartbeat.")] = 120.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Cancel and settle the provider jobs of broker processes that died."""

    def run() -> None:
        from broker._sync import run_sync
        from broker.routing.manager import CloudGPUManager
        from broker.routing.reconcile import ReconcileReport
        from broker.settings import Settings

        manager = CloudGPUManager(settings=Settings())
        manager.reconciler.stale_s = stale_s

        async def sweep() -> ReconcileReport:
            try:
                return await manager.reconciler.reconcile()
            finally:
                await manager.aclose()

        try:
            report = run_sync(sweep())
        finally:
            manager.ledger.close()
        _show(report, as_json)

    run_job_command(run)


def _row(r: dict[str, Any], outcome: str) -> dict[str, Any]:
    return {"attempt": r["id"], "provider": r["provider"], "provider_job_id": r["provider_job_id"],
            "owner_pid": r["owner_pid"], "owner_host": r["owner_host"], "outcome": outcome,
            "cost_usd": round(float(r.get("cost_usd") or 0.0), 8)}


def _show(report: Any, as_json: bool) -> None:
    rows = ([_row(r, r.get("status", "settled")) for r in report.settled]
            + [_row(r, "cancelling (cancel not confirmed yet)") for r in report.cancelling]
            + [_row(r, f"skipped: {why}") for r, why in report.skipped])
    if as_json:
        print_json({"settled": len(report.settled), "cancelling": len(report.cancelling),
                    "skipped": len(report.skipped), "attempts": rows})
        return
    if not rows:
        out.print("nothing to reconcile: no open attempt belongs to a dead process")
        return
    table = Table("attempt", "provider", "provider job", "owner", "outcome", "cost $", title="reconciled")
    for r in rows:
        table.add_row(str(r["attempt"]), r["provider"], r["provider_job_id"] or "-",
                      f"{r['owner_pid']}@{r['owner_host']}", r["outcome"], f"{r['cost_usd']:.6f}")
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command("reconcile")(reconcile)
