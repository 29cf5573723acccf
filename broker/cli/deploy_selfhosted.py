"""`broker deploy kubernetes|ecs|cloudrun|aci`: manifests for a self-hosted GPU worker fleet.

broker writes the platform's own manifests and prints the commands that apply them (kubectl, aws,
the Cloud Run REST API, az); it never calls the platform itself. ``--dry-run`` (or no ``-o``) prints
the manifests on stdout, the commands and notes on stderr; ``-o DIR`` writes one file per manifest.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from broker.cli.common import err, guarded

Name = Annotated[str, typer.Option("--name", help="Name of the deployment/service/task family.")]
Image = Annotated[str, typer.Option("--image", help="The pushed worker image (containers/worker.Dockerfile).")]
Gpus = Annotated[int, typer.Option("--gpus", help="GPUs per worker (0: CPU only).")]
Cpu = Annotated[float, typer.Option("--cpu", help="vCPUs per worker.")]
Memory = Annotated[float, typer.Option("--memory-gib", help="Memory per worker, GiB.")]
MaxReplicas = Annotated[int, typer.Option("--max-replicas", help="Most workers the autoscaler may run.")]
Concurrency = Annotated[int, typer.Option("--concurrency", help="Jobs one worker runs at once.")]
MaxWaiting = Annotated[int, typer.Option("--max-waiting", help="Jobs one worker holds waiting before it says busy.")]
Target = Annotated[float, typer.Option("--target-queue-depth",
                                       help="Scale out when workers average more queued+running jobs than this.")]
Engine = Annotated[str, typer.Option("--engine", help="Speech engine loaded at start: piper | csm.")]
Secret = Annotated[str, typer.Option("--api-key-secret", help="Name of the secret holding the worker's API key "
                                     "(created with the printed command; the key is never written).")]
Output = Annotated[Path | None, typer.Option("--output", "-o", help="Write the manifests into this folder.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the manifests on stdout; write nothing.")]


def _emit(module: str, options: Any, output: Path | None, dry_run: bool) -> None:
    import importlib

    bundle = importlib.import_module(f"broker.deploy.{module}").bundle(options)
    if dry_run or output is None:
        sys.stdout.write(bundle.stdout())
        where = "the folder -o DIR writes"
    else:
        if output.exists() and not output.is_dir():
            from broker.errors import InvalidRequest

            raise InvalidRequest("output", f"{output} exists and is not a folder")
        try:
            written = bundle.write(output)
        except OSError as exc:
            from broker.errors import InvalidRequest

            raise InvalidRequest("output", f"cannot write into {output}: {exc.strerror}") from None
        for path in written:
            err.print(f"wrote {path}", highlight=False, markup=False, soft_wrap=True)
        where = str(output)
    err.print(f"# apply from {where} (with {_key_env()} set in your shell):", highlight=False, markup=False,
              soft_wrap=True)
    for line in bundle.commands:
        err.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)
    for note in bundle.notes:
        err.print(f"# note: {note}", highlight=False, markup=False, soft_wrap=True)


def _key_env() -> str:
    from broker.deploy.fleet import API_KEY_ENV

    return API_KEY_ENV


def deploy_kubernetes(
    name: Name = "broker-worker", image: Image = "broker-worker:latest", gpus: Gpus = 1, cpu: Cpu = 4.0,
    memory_gib: Memory = 16.0,
    min_replicas: Annotated[int, typer.Option("--min-replicas", help="Workers the HPA always keeps.")] = 1,
    max_replicas: MaxReplicas = 4, concurrency: Concurrency = 1, max_waiting: MaxWaiting = 8,
    target_queue_depth: Target = 2.0, engine: Engine = "piper", api_key_secret: Secret = "broker-worker-api-key",
    namespace: Annotated[str, typer.Option("--namespace", "-n")] = "default",
    avatars: Annotated[str | None, typer.Option("--avatars", help="PersistentVolumeClaim with the preset avatars "
                                                "('pvc' creates NAME-avatars).")] = None,
    storage_class: Annotated[str | None, typer.Option("--storage-class")] = None,
    output: Output = None, dry_run: DryRun = False,
) -> None:
    """Deployment + Service + HPA (on the workers' queue depth) for a GPU worker on Kubernetes."""

    def run() -> None:
        from broker.deploy.kubernetes import KubernetesOptions

        _emit("kubernetes", KubernetesOptions(
            name=name, image=image, gpus=gpus, cpu=cpu, memory_gib=memory_gib, min_replicas=min_replicas,
            max_replicas=max_replicas, concurrency=concurrency, max_waiting=max_waiting,
            target_queue_depth=target_queue_depth, engine=engine, api_key_secret=api_key_secret,
            namespace=namespace, avatars=avatars, storage_class=storage_class), output, dry_run)

    guarded(run)


def deploy_ecs(
    name: Name = "broker-worker", image: Image = "broker-worker:latest", gpus: Gpus = 1, cpu: Cpu = 4.0,
    memory_gib: Memory = 16.0,
    min_replicas: Annotated[int, typer.Option("--min-replicas", help="Tasks always running (0 allowed).")] = 1,
    max_replicas: MaxReplicas = 4, concurrency: Concurrency = 1, max_waiting: MaxWaiting = 8,
    target_queue_depth: Target = 2.0, engine: Engine = "piper", api_key_secret: Secret = "broker-worker-api-key",
    cluster: Annotated[str, typer.Option("--cluster")] = "broker",
    region: Annotated[str, typer.Option("--region")] = "us-east-1",
    secret_arn: Annotated[str, typer.Option("--secret-arn", help="ARN of the Secrets Manager secret / SSM "
                                            "parameter with the key.")]
    = "arn:aws:secretsmanager:us-east-1:123456789012:secret:broker-worker-api-key",
    execution_role_arn: Annotated[str, typer.Option("--execution-role-arn")]
    = "arn:aws:iam::123456789012:role/ecsTaskExecutionRole",
    vpc_id: Annotated[str, typer.Option("--vpc-id")] = "vpc-0123456789abcdef0",
    subnet: Annotated[list[str] | None, typer.Option("--subnet", help="Repeat for each subnet.")] = None,
    security_group: Annotated[list[str] | None, typer.Option("--security-group")] = None,
    target_group_arn: Annotated[str, typer.Option("--target-group-arn")]
    = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/broker-worker/0123456789abcdef",
    avatars: Annotated[str | None, typer.Option("--avatars", help="EFS file system id (fs-...) or a host "
                                                "folder with the preset avatars.")] = None,
    output: Output = None, dry_run: DryRun = False,
) -> None:
    """Task definition, target group, service and target-tracking autoscaling for a GPU worker on ECS (EC2)."""

    def run() -> None:
        from broker.deploy.ecs import ECSOptions

        extra: dict[str, Any] = {}
        if subnet:
            extra["subnets"] = list(subnet)
        if security_group:
            extra["security_groups"] = list(security_group)
        _emit("ecs", ECSOptions(
            name=name, image=image, gpus=gpus, cpu=cpu, memory_gib=memory_gib, min_replicas=min_replicas,
            max_replicas=max_replicas, concurrency=concurrency, max_waiting=max_waiting,
            target_queue_depth=target_queue_depth, engine=engine, api_key_secret=api_key_secret, cluster=cluster,
            region=region, secret_arn=secret_arn, execution_role_arn=execution_role_arn, vpc_id=vpc_id,
            target_group_arn=target_group_arn, avatars=avatars, **extra), output, dry_run)

    guarded(run)


def deploy_cloudrun(
    name: Name = "broker-worker", image: Image = "broker-worker:latest",
    gpus: Annotated[int, typer.Option("--gpus", help="0 or 1 (one nvidia-l4 per instance).")] = 1,
    cpu: Cpu = 4.0, memory_gib: Memory = 16.0,
    min_replicas: Annotated[int, typer.Option("--min-replicas", help="Instances kept warm (0: scale to zero).")] = 0,
    max_replicas: MaxReplicas = 4, concurrency: Concurrency = 1, max_waiting: MaxWaiting = 8,
    engine: Engine = "piper", api_key_secret: Secret = "broker-worker-api-key",
    project: Annotated[str, typer.Option("--project")] = "my-project",
    region: Annotated[str, typer.Option("--region")] = "europe-west4",
    service_account: Annotated[str | None, typer.Option("--service-account")] = None,
    avatars: Annotated[str | None, typer.Option("--avatars", help="Cloud Storage bucket with the preset "
                                                "avatars (gs://bucket).")] = None,
    output: Output = None, dry_run: DryRun = False,
) -> None:
    """A Cloud Run v2 Service with an NVIDIA L4 GPU, its key from Secret Manager."""

    def run() -> None:
        from broker.deploy.cloudrun import CloudRunOptions

        _emit("cloudrun", CloudRunOptions(
            name=name, image=image, gpus=gpus, cpu=cpu, memory_gib=memory_gib, min_replicas=min_replicas,
            max_replicas=max_replicas, concurrency=concurrency, max_waiting=max_waiting, engine=engine,
            api_key_secret=api_key_secret, project=project, region=region, service_account=service_account,
            avatars=avatars), output, dry_run)

    guarded(run)


def deploy_aci(
    name: Name = "broker-worker", image: Image = "broker-worker:latest", gpus: Gpus = 1, cpu: Cpu = 4.0,
    memory_gib: Memory = 16.0,
    replicas: Annotated[int, typer.Option("--replicas", help="Container groups to run (ACI has no autoscaler).")]
    = 2,
    concurrency: Concurrency = 1, max_waiting: MaxWaiting = 8, engine: Engine = "piper",
    resource_group: Annotated[str, typer.Option("--resource-group", "-g")] = "broker",
    location: Annotated[str, typer.Option("--location")] = "eastus",
    gpu_sku: Annotated[str, typer.Option("--gpu-sku", help="K80 | P100 | V100.")] = "V100",
    dns_prefix: Annotated[str | None, typer.Option("--dns-prefix")] = None,
    avatars: Annotated[str | None, typer.Option("--avatars", help="Azure Files share with the preset avatars.")]
    = None,
    storage_account: Annotated[str | None, typer.Option("--storage-account")] = None,
    output: Output = None, dry_run: DryRun = False,
) -> None:
    """Azure Container Instances GPU container groups (the key as a secure variable filled at deploy time)."""

    def run() -> None:
        from broker.deploy.aci import ACIOptions

        _emit("aci", ACIOptions(
            name=name, image=image, gpus=gpus, cpu=cpu, memory_gib=memory_gib, min_replicas=replicas,
            max_replicas=max(replicas, 1), concurrency=concurrency, max_waiting=max_waiting, engine=engine,
            resource_group=resource_group, location=location, gpu_sku=gpu_sku, dns_prefix=dns_prefix,
            avatars=avatars, storage_account=storage_account), output, dry_run)

    guarded(run)


def register(app: typer.Typer) -> None:
    app.command("kubernetes")(deploy_kubernetes)
    app.command("ecs")(deploy_ecs)
    app.command("cloudrun")(deploy_cloudrun)
    app.command("aci")(deploy_aci)
