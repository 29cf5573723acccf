"""`broker quote TEXT` (where a job would go, what it would cost and take) and `broker costs` (what was spent)."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from broker.cli.common import check_engine, guarded, out, positive, print_json


def _quote_rows(text: str, render: bool, engine: str | None, deadline: float | None,
                policy: str | None) -> dict[str, Any]:
    from broker.routing.manager import CloudGPUManager
    from broker.settings import Settings
    from broker.types import RenderRequest, SpeechRequest, build

    request = (build(RenderRequest, text=text, engine=engine) if render
               else build(SpeechRequest, text=text, engine=engine))
    settings = Settings()
    settings.ledger.path = ":memory:"  # quoting spends nothing and must not create a ledger file
    manager = CloudGPUManager(settings=settings)
    plan = manager.plan(request, deadline_s=deadline or settings.manager.deadline_s, policy=policy)
    ranked = []
    for i, c in enumerate(plan.ordered, start=1):
        q = c.quote
        fallback = manager.fallback is not None and c.provider is manager.fallback
        ranked.append({
            "rank": i, "provider": q.provider, "kind": c.provider.kind, "hardware": q.hardware,
            "expected_usd": round(q.expected_usd, 8), "expected_seconds": round(q.expected_seconds, 3),
            "queue_s": round(q.breakdown.get("queue", 0.0), 3),
            "cold_start_s": round(q.breakdown.get("cold_start", 0.0), 3),
            "run_s": round(q.breakdown.get("run", 0.0), 3), "speed_basis": q.basis,
            "priced": "unpriced" not in q.breakdown,
            "fallback": fallback,
            "role": "fallback" if fallback else "ranked",
        })
    # Dropped for this job (engine, task, circuit, budget, deadline), then not routed at all (configuration).
    dropped = [{"provider": c.name, "reason": why, "stage": "plan"} for c, why in plan.dropped]
    dropped += [{"provider": r.name, "reason": r.reason, "detail": r.detail, "stage": "config"}
                for r in manager.endpoints if not r.routed]
    catalog = []
    for row in manager.catalog.prices():
        q = manager.catalog.quote(row.provider, row.hardware[0], request, default_engine=settings.engines.default)
        catalog.append({"provider": row.provider, "hardware": row.hardware[0],
                        "expected_usd": round(q.expected_usd, 8), "expected_seconds": round(q.expected_seconds, 3),
                        "price_basis": row.basis, "speed_basis": q.basis, "source": row.source,
                        "checked": row.checked})
    catalog.sort(key=lambda r: (r["expected_usd"], r["expected_seconds"]))
    return {"task": request.task, "words": len(text.split()), "policy": policy or settings.manager.policy,
            "local": _local_role(manager), "ranked": ranked, "dropped": dropped, "catalog": catalog}


def _local_role(manager: Any) -> str:
    """What local does in this ranking, in words (`broker quote` prints it under the table)."""
    mode = manager.local_mode
    if mode == "off" or not any(p.kind == "local" for p in manager.all_providers):
        return "off: local never runs jobs (manager.local = \"off\" or local disabled)"
    if mode == "ranked":
        usd_h = manager.settings.local.usd_per_hour
        return f"ranked: competes with the cloud at local.usd_per_hour = {usd_h:g} (manager.local = \"ranked\")"
    return ("fallback: runs a job only when every cloud endpoint failed or was dropped, never ranked by price "
            "(manager.local = \"fallback\"; \"ranked\" lets it compete)")


def quote(
    text: Annotated[str | None, typer.Argument(
        help="The text to speak (or to speak and render with --render).")] = None,
    file: Annotated[str | None, typer.Option(
        "--file", "-f", help="A book (.txt/.md/.epub): wall time and $ over 1, 4, 16, 64 workers and the mix.")
    ] = None,
    render: Annotated[bool, typer.Option("--render", help="Quote a talking-head render of the text.")] = False,
    engine: Annotated[str | None, typer.Option("--engine", help="piper | csm (default: configured)")] = None,
    deadline: Annotated[float | None, typer.Option("--deadline", help="Seconds the job may take.")] = None,
    policy: Annotated[str | None, typer.Option("--policy", help="cheapest | fastest | deadline")] = None,
    whole_catalog: Annotated[bool, typer.Option("--catalog", help="Also price every row of the catalog.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Rank the providers for TEXT: expected $ and seconds each, and why any was dropped."""

    def run() -> None:
        positive("--deadline", deadline)
        check_engine(engine)
        from broker.errors import InvalidRequest

        if (text is None) == (file is None):
            raise InvalidRequest("text", "give TEXT or --file PATH (not both)")
        if file is not None:
            from broker.cli.longform import quote_file

            quote_file(file, engine, as_json)
            return
        assert text is not None
        data = _quote_rows(text, render, engine, deadline, policy)
        if not whole_catalog:
            data.pop("catalog")
        if as_json:
            print_json(data)
            return
        table = Table("#", "provider", "hardware", "expected $", "expected s", "queue + cold + run", "speed figure",
                      title=f"{data['task']} of {data['words']} words · policy {data['policy']}")
        for r in data["ranked"]:
            usd = f"${r['expected_usd']:.5f}" if r["priced"] else "unpriced"
            split = f"{r['queue_s']:.1f} + {r['cold_start_s']:.1f} + {r['run_s']:.1f}"
            name = r["provider"] + (" (fallback)" if r["fallback"] else " (ranked)" if r["kind"] == "local" else "")
            table.add_row(*(escape(str(c)) for c in (r["rank"], name, r["hardware"], usd,
                                                      f"{r['expected_seconds']:.1f}", split, r["speed_basis"])))
        out.print(table)
        out.print(f"[dim]local:[/] {escape(data['local'])}", highlight=False)
        for d in data["dropped"]:
            what = "dropped" if d["stage"] == "plan" else "not routed"
            out.print(f"[dim]{what}[/] {escape(d['provider'])}: {escape(d['reason'])}", highlight=False)
        if whole_catalog:
            cat = Table("provider", "hardware", "expected $", "expected s", "price", "speed", "checked",
                        title="every catalog row, cold start included (configured or not)")
            for r in data["catalog"]:
                cat.add_row(r["provider"], r["hardware"], f"${r['expected_usd']:.5f}", f"{r['expected_seconds']:.1f}",
                            r["price_basis"], r["speed_basis"], r["checked"])
            out.print(cat)

    guarded(run, as_json=as_json)


def costs(
    days: Annotated[int, typer.Option("--days", help="Only the last N days (0: everything).")] = 30,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """What was spent, by provider and day (from the ledger)."""

    def run() -> None:
        from broker.settings import Settings
        from broker.store import open_store, store_url

        positive("--days", days, allow_zero=True)
        settings = Settings()
        ledger = open_store(settings)  # the shared PostgreSQL ledger when ledger.url names one
        since = time.time() - days * 86400 if days > 0 else None
        try:
            rows = ledger.summary(since=since)
        finally:
            ledger.close()
        total = sum(r["cost_usd"] for r in rows)
        by_provider: dict[str, float] = {}
        for r in rows:
            by_provider[r["provider"]] = by_provider.get(r["provider"], 0.0) + r["cost_usd"]
        if as_json:
            where = str(store_url(settings)) if settings.ledger.url else settings.ledger.path
            print_json({"ledger": where, "days": days, "total_usd": round(total, 8),
                        "by_provider": {k: round(v, 8) for k, v in by_provider.items()},
                        "rows": [{**r, "cost_usd": round(r["cost_usd"], 8)} for r in rows]})
            return
        table = Table("day (UTC)", "provider", "attempts", "ok", "failed", "billed s", "$",
                      title=f"spend, last {days} days" if days > 0 else "spend, all time")
        for r in rows:
            table.add_row(r["day"], r["provider"], str(r["attempts"]), str(r["succeeded"]), str(r["failed"]),
                          f"{r['billed_seconds']:.1f}", f"${r['cost_usd']:.5f}")
        table.add_row("total", "", "", "", "", "", f"${total:.5f}", style="bold")
        out.print(table)

    guarded(run, as_json=as_json)


def register(app: typer.Typer) -> None:
    app.command("quote")(quote)
    app.command("costs")(costs)
