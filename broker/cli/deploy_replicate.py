"""`broker deploy replicate`: push the Cog model and create or update its deployment."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from broker.cli.common import guarded, out, print_json


def deploy_replicate(
    model: Annotated[str, typer.Option("--model", help="Model name (owner/name, or name under your account).")]
    = "broker",
    deployment: Annotated[str | None, typer.Option("--deployment", help="Deployment name (default: --name, else "
                                                   "the model's).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Endpoint name in the config, as [endpoints.NAME] "
                                             "(default: the [replicate] section).")] = None,
    owner: Annotated[str | None, typer.Option("--owner", help="Account or organisation (default: the token's).")]
    = None,
    hardware: Annotated[str | None, typer.Option("--hardware", help="Hardware SKU, e.g. gpu-l40s, gpu-a100-large "
                                                 "(default: replicate.hardware).")] = None,
    min_instances: Annotated[int | None, typer.Option("--min-instances", min=0)] = None,
    max_instances: Annotated[int | None, typer.Option("--max-instances", min=1)] = None,
    version: Annotated[str | None, typer.Option("--version", help="Deploy this version id (skips the push).")]
    = None,
    push: Annotated[bool, typer.Option("--push/--no-push", help="Push the image with `cog push` first "
                                       "(needs the Cog CLI and Docker); --no-push deploys the latest version.")]
    = True,
    stage_dir: Annotated[Path, typer.Option("--stage-dir", help="Where to stage the image's build context.")]
    = Path("build/replicate"),
    config: Annotated[Path | None, typer.Option("--config", help="Config file to record the deployment in "
                                                "(default: $BROKER_CONFIG, ./broker.toml, ~/.config/broker).")]
    = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would happen; change nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Deploy the broker worker to Replicate, idempotently, and record it in the config."""

    def run() -> None:
        from broker.deploy.replicate import DeployPlan, ReplicateDeployer, endpoint_section, write_config
        from broker.settings import Settings, config_path

        endpoint = None if name is None or name == "replicate" else name
        settings = endpoint_section(Settings(), endpoint)
        deployer = ReplicateDeployer(settings, dry_run=dry_run)
        try:
            account = owner or (model.partition("/")[0] if "/" in model else deployer.owner()) or "<your-account>"
            model_name = model if "/" in model else f"{account}/{model}"
            # a named endpoint gets a deployment of its own, so it does not take over the [replicate] one's
            dep_name = deployment or endpoint or model_name.partition("/")[2]
            plan = DeployPlan(
                model=model_name,
                deployment=dep_name if "/" in dep_name else f"{account}/{dep_name}",
                hardware=hardware or settings.hardware,
                min_instances=settings.min_instances if min_instances is None else min_instances,
                max_instances=settings.max_instances if max_instances is None else max_instances,
                version=version,
                push=push and version is None,
                stage_dir=stage_dir,
            )
            result = deployer.run(plan)
        finally:
            deployer.close()
        if not dry_run:
            result.config_path = write_config(config or config_path(), endpoint,
                                              {"deployment": plan.deployment, "hardware": plan.hardware})
        if as_json:
            print_json({"action": result.action, "deployment": result.deployment, "version": result.version,
                        "hardware": plan.hardware, "min_instances": plan.min_instances,
                        "max_instances": plan.max_instances, "steps": result.steps, "dry_run": dry_run,
                        "config": str(result.config_path) if result.config_path else None,
                        "endpoint": endpoint or "replicate"})
            return
        for step in result.steps:
            out.print(f"  {escape(step)}", highlight=False, soft_wrap=True)
        where = f"; recorded in {result.config_path}" if result.config_path else ""
        out.print(f"{result.action}: deployment {plan.deployment} (version {result.version or '?'}, "
                  f"{plan.hardware}, {plan.min_instances}-{plan.max_instances} instances){where}", highlight=False,
                  soft_wrap=True)

    guarded(run, as_json=as_json)


def register(app: typer.Typer) -> None:
    app.command("replicate")(deploy_replicate)
