"""`broker deploy runpod`: image, template and serverless endpoint, idempotently."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from broker.cli.common import guarded, out, print_json

NO_IMAGE = "<--image not given>"  # the same as broker.deploy.runpod.NO_IMAGE, without importing httpx here


def say(line: str) -> None:
    out.print(line, highlight=False, markup=False, soft_wrap=True)


def deploy_runpod(
    image: Annotated[str | None, typer.Option("--image", help="Image to deploy, e.g. you/broker-runpod:0.1 "
                                              "(built and pushed when docker runs here).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Endpoint name, on RunPod (template: NAME-template) "
                                             "and in the config as [endpoints.NAME]; default: the [runpod] "
                                             "section's endpoint.")] = None,
    cpu: Annotated[bool, typer.Option("--cpu", help="A serverless CPU endpoint (no GPU): cheap for Piper.")] = False,
    cpu_flavor: Annotated[list[str] | None, typer.Option("--cpu-flavor", help="CPU endpoints: cpu3c, cpu3g, "
                                                         "cpu5c or cpu5g; repeat in order of preference.")] = None,
    vcpus: Annotated[int | None, typer.Option("--vcpus", help="CPU endpoints: vCPUs per worker (default 2).")] = None,
    build: Annotated[bool | None, typer.Option("--build/--no-build",
                                               help="Build and push the image (default: when docker runs).")] = None,
    gpu: Annotated[list[str] | None, typer.Option("--gpu", help="GPU pool: a RunPod gpuTypeId or a shorthand "
                                                  "(A100-80GB, H100, L40S, RTX4090, ...); repeat in order.")] = None,
    workers_min: Annotated[int | None, typer.Option("--workers-min", help="Always-on workers.")] = None,
    workers_max: Annotated[int | None, typer.Option("--workers-max", help="Most workers at once.")] = None,
    idle_timeout: Annotated[int | None, typer.Option("--idle-timeout", help="Seconds a worker idles "
                                                     "before it stops.")] = None,
    flashboot: Annotated[bool | None, typer.Option("--flashboot/--no-flashboot", help="FlashBoot.")] = None,
    execution_timeout: Annotated[float | None, typer.Option("--execution-timeout",
                                                            help="Seconds a job may run.")] = None,
    engine: Annotated[str | None, typer.Option("--engine", help="Speech engine in the image: piper | csm.")] = None,
    voice: Annotated[str | None, typer.Option("--voice", help="Piper voice .onnx path inside the image.")] = None,
    mode: Annotated[str | None, typer.Option("--mode", help="Handler mode: stream | job.")] = None,
    rest_url: Annotated[str | None, typer.Option("--rest-url", help="RunPod REST API base URL.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Config file to record the endpoint id in "
                                                "(default: the one broker reads).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; change nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Deploy the broker worker to a RunPod serverless endpoint and record its id in the config."""

    def run() -> None:
        from broker.deploy.configfile import deploy_settings
        from broker.deploy.runpod import DeployOptions, RunPodDeployer, write_endpoint_id
        from broker.settings import Settings, config_path

        settings = Settings()
        endpoint = None if name is None or name == "runpod" else name
        rp = deploy_settings(settings, "runpod", "RunPod", endpoint, {"endpoint_id": None})
        compute = "CPU" if cpu or cpu_flavor or vcpus else ("GPU" if gpu else rp.compute_type)
        options = DeployOptions(
            name=name or rp.endpoint_name,
            image=image or rp.image,
            build=build,
            gpu_types=list(gpu) if gpu else list(rp.gpu_types),
            workers_min=rp.workers_min if workers_min is None else workers_min,
            workers_max=rp.workers_max if workers_max is None else workers_max,
            idle_timeout_s=rp.idle_timeout_s if idle_timeout is None else idle_timeout,
            flashboot=rp.flashboot if flashboot is None else flashboot,
            execution_timeout_s=rp.execution_timeout_s if execution_timeout is None else execution_timeout,
            engine=engine or settings.engines.default,
            voice=voice,
            mode=mode or rp.handler_mode,
            endpoint_id=rp.endpoint_id,
            compute_type=compute,
            cpu_flavors=list(cpu_flavor) if cpu_flavor else list(rp.cpu_flavors),
            vcpu_count=vcpus if vcpus is not None else rp.vcpu_count,
        )
        deployer = RunPodDeployer(rp.api_key, rest_url or rp.rest_url)
        target = (config or config_path()).expanduser()
        if dry_run:
            _show_plan(deployer.plan(options, dry_run=True), target, endpoint, as_json)
            return
        plan = deployer.plan(options)
        report = (lambda _: None) if as_json else say
        if not any(s.action == "build" for s in plan.steps):
            report(f"not building: using the pushed image {options.image} (docker is not running here or --no-build)")
        result = deployer.apply(plan, log=report)
        write_endpoint_id(target, result.endpoint_id, endpoint, options)
        where = _where(endpoint)
        if as_json:
            print_json({"endpoint_id": result.endpoint_id, "template_id": result.template_id,
                        "created": result.created, "updated": result.updated, "config": str(target),
                        "endpoint": endpoint or "runpod", "compute_type": options.compute_type})
            return
        say(f"RunPod endpoint {result.endpoint_id} is ready; wrote {where} to {target}")

    guarded(run, as_json=as_json)


def _where(endpoint: str | None) -> str:
    return f"[endpoints.{endpoint}] (kind, endpoint_id, hardware, engines)" if endpoint else "[runpod] endpoint_id"


def _show_plan(plan: Any, target: Path, endpoint: str | None, as_json: bool) -> None:
    steps = [{"action": s.action, "detail": s.detail, **({"body": s.body} if s.body else {}),
              **({"command": s.command} if s.command else {})} for s in plan.steps]
    steps.append({"action": "write config", "detail": f"{_where(endpoint)} in {target}"})
    if as_json:
        print_json({"dry_run": True, "steps": steps, "unchecked": plan.unchecked})
        return
    say("Plan (dry run, nothing changed):")
    for i, step in enumerate(steps, 1):
        say(f"  {i}. {step['action']}: {step['detail']}")
        if "command" in step:
            say(f"     $ {' '.join(step['command'])}")
    if plan.unchecked:
        say(f"Note: {plan.unchecked}")
    if plan.options.image == NO_IMAGE:
        say("Note: no --image given; a real deploy needs one (it is built and pushed there when docker runs).")


def register(app: typer.Typer) -> None:
    app.command("runpod")(deploy_runpod)
