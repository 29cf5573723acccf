"""Assemble a gateway from settings (or from parts, in tests) and serve it with uvicorn."""

from __future__ import annotations

import ipaddress
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from broker.gateway.api import Gateway, create_app
from broker.gateway.db import Database, is_postgres, open_database
from broker.gateway.jobs import JobStore
from broker.gateway.media import MediaUrls
from broker.gateway.outputs import DirectoryOutputs, OutputStore, S3Outputs
from broker.gateway.queues import InProcessQueue, JobQueue, ProcrastinateQueue
from broker.gateway.runner import JobRunner, RunnerConfig
from broker.gateway.tenants import KeyStore
from broker.settings import Settings
from broker.worker.fetch import FetchPolicy

log = logging.getLogger("broker.gateway")


def database_url(settings: Settings) -> str:
    if settings.gateway.database_url:
        return settings.gateway.database_url
    ledger = Path(settings.ledger.path).expanduser()
    return f"sqlite:///{ledger.with_name('gateway.sqlite')}"


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def output_store(settings: Settings) -> OutputStore:
    g = settings.gateway
    if g.s3_bucket:
        secret = g.s3_secret_access_key.get_secret_value() if g.s3_secret_access_key else None
        return S3Outputs(g.s3_bucket, prefix=g.s3_prefix, endpoint_url=g.s3_endpoint_url, region=g.s3_region,
                         access_key_id=g.s3_access_key_id, secret_access_key=secret)
    return DirectoryOutputs(g.output_dir)


async def open_tables(db: Database) -> tuple[JobStore, KeyStore]:
    jobs, keys = JobStore(db), KeyStore(db)
    await jobs.setup()
    await keys.setup()
    return jobs, keys


def build_app(settings: Settings, manager: Any, *, db_url: str | None = None, outputs: OutputStore | None = None,
              host: str | None = None, queue_options: dict[str, Any] | None = None) -> FastAPI:
    """The ASGI app; tables, queue and workers start in its lifespan (so any ASGI server can run it)."""
    g = settings.gateway
    url = db_url or database_url(settings)
    bind = host if host is not None else g.host
    db = open_database(url)
    jobs, keys = JobStore(db), KeyStore(db)
    secret = g.webhook_secret.get_secret_value() if g.webhook_secret else None
    runner = JobRunner(manager, jobs, keys, outputs or output_store(settings),
                       RunnerConfig(lease_s=g.lease_s, webhook_secret=secret, webhook_attempts=g.webhook_attempts))
    opts = {"concurrency": g.concurrency, **(queue_options or {})}
    queue: JobQueue = ProcrastinateQueue(runner, url, **opts) if is_postgres(url) else \
        InProcessQueue(runner, concurrency=opts["concurrency"], sweep_s=opts.get("sweep_s", 5.0))
    # What one job's media URLs may add up to is what an upload may: the bytes land in the job row alike.
    media = MediaUrls(FetchPolicy.from_settings(g.fetch, max_bytes=g.max_body_bytes), max_total_bytes=g.max_body_bytes)
    gw = Gateway(manager=manager, jobs=jobs, keys=keys, outputs=runner.outputs, runner=runner, queue=queue,
                 max_body_bytes=g.max_body_bytes, media=media)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        await jobs.setup()
        await keys.setup()
        has_keys = await keys.any_keys()
        gw.open_access = not has_keys
        if not has_keys and not is_loopback(bind):
            log.warning("broker serve: no API keys and bound to %s — anyone who can reach it can spend your "
                        "budget; create one with `broker serve keys create`", bind)
        log.info("broker serve: %s", queue.description)
        await queue.start()
        gw.ready = True
        try:
            yield
        finally:
            gw.ready = False
            await queue.stop()
            await manager.aclose()
            await db.close()

    app = create_app(gw)
    app.router.lifespan_context = lifespan
    app.state.gateway = gw
    return app
