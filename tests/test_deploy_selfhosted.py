"""`broker deploy kubernetes|ecs|cloudrun|aci`: every manifest checked by the platform's own schema or SDK models.

Kubernetes: ``kubernetes-validate`` (the API's OpenAPI schemas, strict: unknown fields fail). ECS:
botocore's service models and its ``ParamValidator`` on each API call's input. Cloud Run: the
``run_v2.Service`` proto, parsed with unknown fields rejected. ACI: the ``azure-mgmt-containerinstance``
``ContainerGroup`` model, which must take the document and give it back unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from broker.cli import app
from broker.deploy import aci, cloudrun, ecs, kubernetes
from broker.deploy.fleet import API_KEY_ENV, HEALTH_PATH, QUEUE_DEPTH_METRIC, READY_PATH
from broker.errors import InvalidRequest
from tests.conftest import run_cli

kubernetes_validate = pytest.importorskip("kubernetes_validate")
botocore_session = pytest.importorskip("botocore.session")
run_v2 = pytest.importorskip("google.cloud.run_v2")
aci_models = pytest.importorskip("azure.mgmt.containerinstance.models")

SECRET = "sk-live-DO-NOT-LEAK-4242"


# -- the platforms' own validators -----------------------------------------------------------------
def validate_kubernetes(doc: dict[str, Any]) -> None:
    from kubernetes_validate.utils import latest_version

    kubernetes_validate.validate(doc, latest_version(), strict=True)


_ECS_CALLS = {"task-definition.json": ("ecs", "RegisterTaskDefinition"), "service.json": ("ecs", "CreateService"),
              "target-group.json": ("elbv2", "CreateTargetGroup"),
              "scalable-target.json": ("application-autoscaling", "RegisterScalableTarget"),
              "scaling-policy.json": ("application-autoscaling", "PutScalingPolicy")}


def validate_aws(service: str, operation: str, params: dict[str, Any]) -> None:
    from botocore.validate import ParamValidator

    model = botocore_session.get_session().get_service_model(service)
    report = ParamValidator().validate(params, model.operation_model(operation).input_shape)
    if report.has_errors():
        raise ValueError(report.generate_report())


def validate_cloudrun(doc: dict[str, Any]) -> Any:
    from google.protobuf import json_format

    return json_format.ParseDict(doc, run_v2.Service.pb(run_v2.Service()), ignore_unknown_fields=False)


def validate_aci(doc: dict[str, Any]) -> Any:
    body = {k: v for k, v in doc.items() if k != "apiVersion"}  # the YAML file's own header, not the resource
    group = aci_models.ContainerGroup.deserialize(body)
    back = group.serialize(keep_readonly=True)
    if back != body:
        raise ValueError(f"the ContainerGroup model did not take the document as written: {back} != {body}")
    for name in ("containers", "os_type"):
        if getattr(group, name) is None:
            raise ValueError(f"required {name} missing")
    return group


def test_the_validators_reject_what_the_platforms_would() -> None:
    """Each check can fail: a misspelt field or a wrong type is caught."""
    deployment = kubernetes.deployment(kubernetes.KubernetesOptions())
    deployment["spec"]["replicaz"] = 2
    with pytest.raises(Exception, match="replicaz"):
        validate_kubernetes(deployment)
    task = ecs.task_definition(ecs.ECSOptions())
    task["containerDefinitions"][0]["resourceRequirements"] = [{"type": "GPU", "value": 1}]
    with pytest.raises(ValueError, match="value"):
        validate_aws("ecs", "RegisterTaskDefinition", task)
    service = cloudrun.service(cloudrun.CloudRunOptions())
    service["template"]["gpuCount"] = 1
    with pytest.raises(Exception, match="gpuCount"):
        validate_cloudrun(service)
    group = aci.container_group(aci.ACIOptions(), 0)
    group["properties"]["containers"][0]["properties"]["gpus"] = 1
    with pytest.raises(ValueError):
        validate_aci(group)


# -- each platform ---------------------------------------------------------------------------------
@pytest.mark.parametrize("avatars", [None, "pvc", "existing-avatars"])
@pytest.mark.parametrize("gpus", [0, 1, 2])
def test_kubernetes_manifests_validate(avatars: str | None, gpus: int) -> None:
    bundle = kubernetes.bundle(kubernetes.KubernetesOptions(gpus=gpus, avatars=avatars, min_replicas=2,
                                                            max_replicas=6, target_queue_depth=1.5))
    docs = bundle.files["broker-worker.yaml"]
    for doc in docs:
        validate_kubernetes(doc)
    kinds = [d["kind"] for d in docs]
    assert kinds[-3:] == ["Deployment", "Service", "HorizontalPodAutoscaler"]
    assert ("PersistentVolumeClaim" in kinds) == (avatars == "pvc")
    worker = docs[kinds.index("Deployment")]["spec"]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"].get("nvidia.com/gpu") == (str(gpus) if gpus else None)
    assert worker["livenessProbe"]["httpGet"]["path"] == HEALTH_PATH
    assert worker["readinessProbe"]["httpGet"]["path"] == READY_PATH
    assert worker["args"][worker["args"].index("--max-waiting") + 1] == "8"
    hpa = docs[kinds.index("HorizontalPodAutoscaler")]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == QUEUE_DEPTH_METRIC
    assert hpa["metrics"][0]["pods"]["target"]["averageValue"] == "1500m"
    # The stdout form is a YAML stream a `kubectl apply -f -` takes.
    assert [d["kind"] for d in yaml.safe_load_all(bundle.stdout())] == kinds


@pytest.mark.parametrize("avatars", [None, "fs-0abc1234", "/opt/broker/avatars"])
def test_ecs_inputs_validate(avatars: str | None) -> None:
    bundle = ecs.bundle(ecs.ECSOptions(avatars=avatars, gpus=2, min_replicas=0, max_replicas=5))
    assert set(bundle.files) == set(_ECS_CALLS)
    for name, (service, operation) in _ECS_CALLS.items():
        validate_aws(service, operation, bundle.files[name])
    worker = bundle.files["task-definition.json"]["containerDefinitions"][0]
    assert worker["resourceRequirements"] == [{"type": "GPU", "value": "2"}]
    assert HEALTH_PATH in worker["healthCheck"]["command"][1]
    assert bundle.files["target-group.json"]["HealthCheckPath"] == READY_PATH
    policy = bundle.files["scaling-policy.json"]["TargetTrackingScalingPolicyConfiguration"]
    assert policy["CustomizedMetricSpecification"]["MetricName"] == QUEUE_DEPTH_METRIC
    target = bundle.files["scalable-target.json"]
    assert (target["MinCapacity"], target["MaxCapacity"]) == (0, 5)
    assert json.loads(bundle.stdout()).keys() == bundle.files.keys()
    assert "--secret-arn" in bundle.notes[0] and "--target-group-arn" in bundle.notes[0]
    mine = ecs.bundle(ecs.ECSOptions(
        secret_arn="arn:aws:ssm:eu-west-1:555566667777:parameter/broker/key",
        execution_role_arn="arn:aws:iam::555566667777:role/exec", vpc_id="vpc-1", subnets=["subnet-1"],
        security_groups=["sg-1"], target_group_arn="arn:aws:elasticloadbalancing:eu-west-1:555566667777:tg/x/1"))
    assert not any("documentation examples" in n for n in mine.notes)
    validate_aws("ecs", "RegisterTaskDefinition", mine.files["task-definition.json"])


@pytest.mark.parametrize(("gpus", "avatars"), [(1, "gs://broker-avatars"), (0, None)])
def test_cloudrun_service_validates(gpus: int, avatars: str | None) -> None:
    bundle = cloudrun.bundle(cloudrun.CloudRunOptions(gpus=gpus, avatars=avatars, max_replicas=3, concurrency=2,
                                                      max_waiting=4))
    msg = validate_cloudrun(bundle.files["service.json"])
    tpl = msg.template
    assert tpl.scaling.max_instance_count == 3 and tpl.max_instance_request_concurrency == 6
    worker = tpl.containers[0]
    assert worker.liveness_probe.http_get.path == HEALTH_PATH and worker.readiness_probe.http_get.path == READY_PATH
    startup = worker.startup_probe
    assert startup.http_get.path == READY_PATH, "no traffic before the engines are loaded"
    assert startup.failure_threshold * startup.period_seconds <= cloudrun.STARTUP_PROBE_MAX_S
    from google.api import launch_stage_pb2

    assert msg.launch_stage == launch_stage_pb2.LaunchStage.BETA, "readiness probes are a Preview feature"
    if gpus:
        assert tpl.node_selector.accelerator == "nvidia-l4" and worker.resources.limits["nvidia.com/gpu"] == "1"
        assert worker.resources.cpu_idle is False
        assert tpl.volumes[0].gcs.bucket == "broker-avatars" and tpl.volumes[0].gcs.read_only
    else:
        assert not tpl.node_selector.accelerator and "nvidia.com/gpu" not in worker.resources.limits


def test_cloudrun_enforces_the_l4_minimums() -> None:
    with pytest.raises(InvalidRequest, match="4 CPU and 16 GiB"):
        cloudrun.bundle(cloudrun.CloudRunOptions(cpu=2, memory_gib=8))
    with pytest.raises(InvalidRequest, match="one GPU"):
        cloudrun.bundle(cloudrun.CloudRunOptions(gpus=2))
    cloudrun.bundle(cloudrun.CloudRunOptions(gpus=0, cpu=2, memory_gib=4))  # no GPU, no floor


@pytest.mark.parametrize("avatars", [None, "avatars"])
def test_aci_groups_validate(avatars: str | None) -> None:
    bundle = aci.bundle(aci.ACIOptions(min_replicas=3, avatars=avatars, storage_account="brokerstore"))
    assert list(bundle.files) == ["aci-0.yaml", "aci-1.yaml", "aci-2.yaml"]
    for doc in bundle.files.values():
        group = validate_aci(doc)
        worker = group.containers[0]
        assert worker.resources.requests.gpu.count == 1 and worker.resources.requests.gpu.sku == "V100"
        assert worker.liveness_probe.http_get.path == HEALTH_PATH
        assert worker.readiness_probe.http_get.path == READY_PATH
        assert (group.volumes is not None) == bool(avatars)
    assert "azurecontainer.io:8000" in bundle.notes[-1]
    assert len(list(yaml.safe_load_all(bundle.stdout()))) == 3


# -- the key never appears ---------------------------------------------------------------------------
def _key_refs(platform: str, files: dict[str, Any]) -> list[Any]:
    """Where each manifest says the key comes from."""
    if platform == "kubernetes":
        deploy = next(d for d in files["broker-worker.yaml"] if d["kind"] == "Deployment")
        env = deploy["spec"]["template"]["spec"]["containers"][0]["env"]
        return [e for e in env if e["name"] == API_KEY_ENV]
    if platform == "ecs":
        worker = files["task-definition.json"]["containerDefinitions"][0]
        assert all(e["name"] != API_KEY_ENV for e in worker["environment"])
        return [s for s in worker["secrets"] if s["name"] == API_KEY_ENV]
    if platform == "cloudrun":
        env = files["service.json"]["template"]["containers"][0]["env"]
        return [e for e in env if e["name"] == API_KEY_ENV]
    env = files["aci-0.yaml"]["properties"]["containers"][0]["properties"]["environmentVariables"]
    return [e for e in env if e["name"] == API_KEY_ENV]


@pytest.mark.parametrize("platform", ["kubernetes", "ecs", "cloudrun", "aci"])
def test_the_api_key_is_never_inline(platform: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, SECRET)
    monkeypatch.setenv("BROKER_HTTP__API_KEY", SECRET)
    runner = CliRunner()
    printed = runner.invoke(app, ["deploy", platform, "--dry-run", "--image", "reg.example/broker-worker:1"])
    assert printed.exit_code == 0, printed.output
    written = runner.invoke(app, ["deploy", platform, "-o", str(tmp_path), "--image", "reg.example/broker-worker:1"])
    assert written.exit_code == 0, written.output
    files = sorted(tmp_path.iterdir())
    assert files
    texts = [printed.output, written.output, *(f.read_text() for f in files)]
    assert all(SECRET not in t for t in texts)
    loaded = {f.name: (json.loads(f.read_text()) if f.suffix == ".json" else
                       (list(yaml.safe_load_all(f.read_text())) if platform == "kubernetes"
                        else yaml.safe_load(f.read_text()))) for f in files}
    [ref] = _key_refs(platform, loaded)
    assert "value" not in ref, "a literal value would put the key in the manifest"
    if platform == "kubernetes":
        assert ref["valueFrom"]["secretKeyRef"] == {"name": "broker-worker-api-key", "key": "api-key"}
    elif platform == "ecs":
        assert ref["valueFrom"].startswith("arn:aws:secretsmanager:")
    elif platform == "cloudrun":
        assert ref["valueSource"]["secretKeyRef"]["secret"] == "broker-worker-api-key"
    else:
        assert ref["secureValue"] == "${" + API_KEY_ENV + "}"


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = runner.invoke(app, ["deploy", "cloudrun", "--cpu", "2", "--memory-gib", "8", "-o", str(tmp_path / "out")])
    assert bad.exit_code == 2 and "16 GiB" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "out").exists(), "nothing is written"
    name = runner.invoke(app, ["deploy", "kubernetes", "--name", "Broker_Worker"])
    assert name.exit_code == 2 and "lowercase" in name.output
    replicas = runner.invoke(app, ["deploy", "ecs", "--min-replicas", "5", "--max-replicas", "2"])
    assert replicas.exit_code == 2
    (tmp_path / "file").write_text("x")
    not_dir = runner.invoke(app, ["deploy", "aci", "-o", str(tmp_path / "file")])
    assert not_dir.exit_code == 2 and "not a folder" in not_dir.output


def test_dry_run_stdout_is_only_the_manifests() -> None:
    """As a user pipes it: `broker deploy kubernetes --dry-run | kubectl apply -f -`."""
    proc = run_cli("deploy", "kubernetes", "--dry-run", "--avatars", "pvc", "--max-replicas", "3",
                   env={API_KEY_ENV: SECRET})
    assert proc.returncode == 0, proc.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(proc.stdout)]
    assert kinds == ["PersistentVolumeClaim", "Deployment", "Service", "HorizontalPodAutoscaler"]
    assert "kubectl -n default apply -f broker-worker.yaml" in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
