"""`broker deploy modal`: deploy the worker app to Modal and record it in the config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from broker.cli.common import guarded, out, print_json


def deploy_modal(
    gpu: Annotated[str | None, typer.Option("--gpu", help="Modal GPU type: T4, L4, A10G, L40S, A100-80GB, H100…")]
    = None,
    min_containers: Annotated[int | None, typer.Option("--min-containers", help="Containers kept warm.")] = None,
    max_containers: Annotated[int | None, typer.Option("--max-containers", help="Most containers at once.")]
    = None,
    scaledown_window: Annotated[
        int | None, typer.Option("--scaledown-window", help="Idle seconds before a container stops (2-3600).")
    ] = None,
    timeout: Annotated[int | None, typer.Option("--timeout", help="Longest job, in seconds.")] = None,
    snapshot: Annotated[
        bool | None, typer.Option("--snapshot/--no-snapshot", help="Memory snapshots for fast cold starts.")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Endpoint name in the config, as [endpoints.NAME] "
                                             "(its app is named after it unless --app-name); default: the "
                                             "[modal] section.")] = None,
    app_name: Annotated[str | None, typer.Option("--app-name")] = None,
    environment: Annotated[str | None, typer.Option("--environment", help="Modal environment.")] = None,
    image: Annotated[str | None, typer.Option("--image", help="Registry image built from containers/.")] = None,
    app_file: Annotated[Path | None, typer.Option("--app-file", help="Default: handlers/modal/app.py.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Config file to record the deploy in.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; deploy nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Deploy handlers/modal/app.py (GPU class + HTTPS endpoint) and write its names to the config."""

    def run() -> None:
        from broker.deploy import modal as deploy
        from broker.providers.modal import modal_token_configured
        from broker.settings import Settings, config_path

        settings = Settings()
        endpoint = None if name is None or name == "modal" else name
        plan = deploy.plan_from_settings(
            settings, endpoint=endpoint, app_name=app_name, hardware=gpu, min_containers=min_containers,
            max_containers=max_containers, scaledown_window_s=scaledown_window, memory_snapshot=snapshot,
            timeout_s=timeout, environment=environment, image=image, app_file=app_file,
        )
        target = config or config_path()
        if dry_run:
            where = f"[endpoints.{endpoint}]" if endpoint else "[modal]"
            summary = {**plan.summary(), "credentials": modal_token_configured(settings),
                       "config": str(target), "section": where, "dry_run": True}
            if as_json:
                print_json(summary)
                return
            out.print(f"[bold]would deploy[/] {escape(f'{plan.app_name}.{plan.class_name}')} from "
                      f"{escape(str(plan.app_file))}", highlight=False, soft_wrap=True)
            for key in ("hardware", "min_containers", "max_containers", "scaledown_window_s", "memory_snapshot",
                        "timeout_s", "environment", "image"):
                out.print(f"  {key:<19} {escape(str(summary[key]))}", highlight=False, soft_wrap=True)
            out.print(f"  {'command':<19} {escape(str(summary['command']))}", highlight=False, soft_wrap=True)
            out.print(f"  {'credentials':<19} {'found' if summary['credentials'] else 'MISSING'}")
            out.print(f"  {'records to':<19} {escape(where)} in {escape(str(target))}", highlight=False,
                      soft_wrap=True)
            return
        deploy.check_credentials(settings)  # before any network
        result = deploy.run_deploy(plan)
        written = deploy.record(result, target, endpoint, plan)
        if as_json:
            print_json({"app_name": result.app_name, "class_name": result.class_name, "url": result.url,
                        "config": str(written), "endpoint": endpoint or "modal"})
            return
        out.print(f"deployed [bold]{escape(f'{result.app_name}.{result.class_name}')}[/] · recorded in "
                  f"{escape(str(written))}", highlight=False, soft_wrap=True)
        if result.url:
            out.print(f"  web endpoint {escape(result.url)} (needs a proxy auth token: modal.proxy_key / "
                      "proxy_secret)", highlight=False, soft_wrap=True)

    guarded(run, as_json=as_json)


def register(app: typer.Typer) -> None:
    app.command("modal")(deploy_modal)
