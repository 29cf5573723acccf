"""`broker serve`: the HTTP job gateway; `broker serve keys …`: its tenants' API keys."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from broker.cli.common import EXIT_BAD_INPUT, err, fail, out, print_json

serve_app = typer.Typer(help="The HTTP job gateway: the manager behind one API (any language can call it).",
                        invoke_without_command=True)
keys_app = typer.Typer(help="API keys of the gateway's tenants (each sees only its own jobs, with its own budgets "
                            "and rate limit).",
                       no_args_is_help=True)
serve_app.add_typer(keys_app, name="keys")


def _settings_and_url(database: str | None) -> tuple[object, str]:
    from broker.gateway.server import database_url
    from broker.settings import Settings

    settings = Settings()
    if database:
        settings.gateway.database_url = database
    return settings, database_url(settings)


@serve_app.callback()
def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option("--host", help="Address to bind (default: gateway.host).")] = None,
    port: Annotated[int | None, typer.Option("--port", "-p", min=0, max=65535)] = None,
    database: Annotated[str | None, typer.Option("--database", help="sqlite:///… or postgresql://…")] = None,
    concurrency: Annotated[int | None, typer.Option("--concurrency", min=1, help="Jobs run at once here.")] = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Serve the job API, the dashboard (/) and /metrics until interrupted."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        import uvicorn

        from broker.gateway.server import build_app, is_loopback
    except ImportError as exc:
        fail(f"the gateway needs {exc.name}: pip install 'broker[gateway]'", EXIT_BAD_INPUT)
    from broker.errors import BrokerError
    from broker.routing.manager import CloudGPUManager

    settings, url = _settings_and_url(database)
    g = settings.gateway  # type: ignore[attr-defined]
    if concurrency is not None:
        g.concurrency = concurrency
    bind = host or g.host
    try:
        manager = CloudGPUManager(settings=settings)  # type: ignore[arg-type]
        app = build_app(settings, manager, db_url=url, host=bind)  # type: ignore[arg-type]
    except BrokerError as exc:
        fail(escape(exc.message), EXIT_BAD_INPUT)
    mode = "replicas share the PostgreSQL queue" if url.startswith("postgres") else \
        "one process, in-process queue (embedded SQLite); use --database postgresql://… to scale out"
    err.print(f"broker serve on http://{bind}:{port or g.port} — {escape(mode)}", highlight=False)
    if not is_loopback(bind):
        err.print("[yellow]note:[/] bound beyond loopback: create API keys (`broker serve keys create`)")
    uvicorn.run(app, host=bind, port=port if port is not None else g.port, log_level=log_level)


async def _keys(url: str):  # type: ignore[no-untyped-def]
    from broker.gateway.db import open_database
    from broker.gateway.server import open_tables

    db = open_database(url)
    _, keys = await open_tables(db)
    return db, keys


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="Who the key is for.")] = "default",
    budget_usd: Annotated[float | None, typer.Option(
        "--budget-usd", help="The tenant's daily budget in dollars (rolling 24 h), held across replicas.")] = None,
    monthly_usd: Annotated[float | None, typer.Option(
        "--monthly-usd", help="The tenant's monthly budget in dollars (rolling 30 days).")] = None,
    rate: Annotated[int | None, typer.Option("--rate", min=1, help="Jobs a minute.")] = None,
    database: Annotated[str | None, typer.Option("--database")] = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Create a key. It is printed once; only its hash is stored."""
    for flag, value in (("--budget-usd", budget_usd), ("--monthly-usd", monthly_usd)):
        if value is not None and not value > 0:  # also NaN
            fail(f"{flag} must be a positive number of dollars, not {value:g}", EXIT_BAD_INPUT)
    _, url = _settings_and_url(database)

    async def go() -> tuple[str, object]:
        db, keys = await _keys(url)
        try:
            return await keys.create(name, daily_budget_usd=budget_usd, monthly_budget_usd=monthly_usd,
                                     rate_per_minute=rate)
        finally:
            await db.close()

    key, tenant = asyncio.run(go())
    if json_out:
        print_json({"key": key, **tenant.public(), "webhook_secret": tenant.webhook_secret})  # type: ignore[attr-defined]
        return
    out.print(f"key: {key}", highlight=False)
    out.print(f"tenant: {tenant.id}  webhook secret: {tenant.webhook_secret}", highlight=False)  # type: ignore[attr-defined]
    err.print("Store the key now: it is not shown again.")


@keys_app.command("list")
def keys_list(database: Annotated[str | None, typer.Option("--database")] = None) -> None:
    """Tenants and their limits (never the keys)."""
    _, url = _settings_and_url(database)

    async def go() -> list[dict[str, object]]:
        db, keys = await _keys(url)
        try:
            return await keys.list_keys()
        finally:
            await db.close()

    table = Table("tenant", "name", "key", "daily $", "monthly $", "jobs/min", "revoked")
    for row in asyncio.run(go()):
        table.add_row(*(escape(str(row[k] if row[k] is not None else "—")) for k in
                        ("id", "name", "hint", "daily_budget_usd", "monthly_budget_usd", "rate_per_minute")),
                      "yes" if row["revoked_at"] else "")
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(tenant: str, database: Annotated[str | None, typer.Option("--database")] = None) -> None:
    """Revoke a tenant's key (its jobs and costs stay)."""
    _, url = _settings_and_url(database)

    async def go() -> bool:
        db, keys = await _keys(url)
        try:
            return await keys.revoke(tenant)
        finally:
            await db.close()

    if not asyncio.run(go()):
        fail(f"no active key for tenant {escape(tenant)}", EXIT_BAD_INPUT)
    out.print(f"revoked {escape(tenant)}")


def register(app: typer.Typer) -> None:
    app.add_typer(serve_app, name="serve")
