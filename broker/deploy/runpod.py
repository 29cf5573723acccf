"""`broker deploy runpod`: build and push the worker image, then create or update its template and
serverless endpoint through RunPod's REST API, and record the endpoint id in the config.

Idempotent: the endpoint is found by id (from the config) or by name, its template by name, and both
are updated in place; every endpoint gets its own template ("<name>-template").

REST shapes: RunPod's OpenAPI document (github.com/runpod/docs api-reference/openapi.json, commit
a900806 of 2026-08-20, read again 2026-12-01): ``POST/GET /templates``, ``PATCH /templates/{id}``,
``POST/GET /endpoints``, ``PATCH /endpoints/{id}``; Bearer auth.

CPU endpoints (``--cpu``), from the same document's ``EndpointCreateInput``: ``computeType`` is "GPU"
(default) or "CPU"; with CPU, ``cpuFlavorIds`` (enum cpu3c, cpu3g, cpu5c, cpu5g; the order is the rent
order) and ``vcpuCount`` (default 2) apply and the GPU fields are ignored; a template's ``category`` is
NVIDIA, AMD or CPU. runpod/runpod-python issue #545 reports a CPU create coming back as a GPU endpoint:
check the console after a first CPU deploy.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from broker.errors import AuthenticationFailed, ConfigurationError, ProviderError, ProviderUnavailable

#: hardware names used in price rows → RunPod gpuTypeIds (from the OpenAPI enum), best first
GPU_SHORTHANDS: dict[str, list[str]] = {
    "A100-80GB": ["NVIDIA A100 80GB PCIe", "NVIDIA A100-SXM4-80GB"],
    "H100": ["NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL"],
    "H200": ["NVIDIA H200"],
    "B200": ["NVIDIA B200"],
    "L40S": ["NVIDIA L40S"],
    "L40": ["NVIDIA L40"],
    "L4": ["NVIDIA L4"],
    "A40": ["NVIDIA A40"],
    "A6000": ["NVIDIA RTX A6000"],
    "A5000": ["NVIDIA RTX A5000"],
    "A4000": ["NVIDIA RTX A4000"],
    "RTX4090": ["NVIDIA GeForce RTX 4090"],
    "RTX5090": ["NVIDIA GeForce RTX 5090"],
    "RTX3090": ["NVIDIA GeForce RTX 3090"],
}

#: RunPod's serverless CPU flavours (EndpointCreateInput.cpuFlavorIds enum, 2026-08-20)
CPU_FLAVORS = ("cpu3c", "cpu3g", "cpu5c", "cpu5g")
#: what the plan shows when no image was given (a dry run needs none)
NO_IMAGE = "<--image not given>"

Runner = Callable[[Sequence[str]], int]


def repo_root() -> Path:
    import broker

    return Path(broker.__file__).resolve().parent.parent


@dataclass
class DeployOptions:
    name: str = "broker"
    image: str | None = None
    #: None = build and push when a docker engine answers
    build: bool | None = None
    gpu_types: list[str] = field(default_factory=lambda: ["A100-80GB"])
    workers_min: int = 0
    workers_max: int = 3
    idle_timeout_s: int = 5
    flashboot: bool = True
    execution_timeout_s: float = 600.0
    engine: str = "piper"
    voice: str | None = None
    mode: str = "stream"
    container_disk_gb: int = 20
    #: endpoint to update (from the config); found by name when absent or gone
    endpoint_id: str | None = None
    base_image: str = "broker-base:local"
    #: "GPU" or "CPU" (a serverless CPU endpoint: cpu_flavors × vcpu_count, no GPU)
    compute_type: str = "GPU"
    cpu_flavors: list[str] = field(default_factory=lambda: ["cpu3c", "cpu5c"])
    vcpu_count: int = 2

    @property
    def cpu(self) -> bool:
        return self.compute_type == "CPU"

    @property
    def hardware(self) -> str:
        """The price row the endpoint is quoted with: "cpu" (2 vCPUs) / "cpu-N", or the first GPU."""
        if self.cpu:
            return "cpu" if self.vcpu_count == 2 else f"cpu-{self.vcpu_count}"
        first = self.gpu_types[0] if self.gpu_types else "A100-80GB"
        # a gpuTypeId ("NVIDIA L40S") is priced under its shorthand ("L40S")
        return next((short for short, ids in GPU_SHORTHANDS.items() if first in ids), first)

    def summary(self) -> str:
        """What the endpoint runs on, for plans and logs."""
        if self.cpu:
            where = f"CPU {'/'.join(self.cpu_flavors)} x {self.vcpu_count} vCPU"
        else:
            where = f"GPU {', '.join(self.gpu_type_ids())}"
        return f"{where}; workers {self.workers_min}-{self.workers_max}; image {self.image}"

    def gpu_type_ids(self) -> list[str]:
        ids: list[str] = []
        for gpu in self.gpu_types:
            for found in GPU_SHORTHANDS.get(gpu, [gpu]):
                if found not in ids:
                    ids.append(found)
        return ids

    def validate(self) -> None:
        if not self.name.strip():
            raise ConfigurationError("the endpoint needs a name (--name)")
        if self.mode not in ("stream", "job"):
            raise ConfigurationError(f"--mode must be stream or job, not {self.mode!r}")
        if not 0 <= self.workers_min <= self.workers_max:
            raise ConfigurationError("need 0 <= --workers-min <= --workers-max")
        if not 1 <= self.idle_timeout_s <= 3600:
            raise ConfigurationError("--idle-timeout must be between 1 and 3600 seconds")
        if self.execution_timeout_s <= 5:
            raise ConfigurationError("--execution-timeout must be more than 5 seconds")
        if self.compute_type not in ("GPU", "CPU"):
            raise ConfigurationError(f"compute type must be GPU or CPU, not {self.compute_type!r}")
        if self.cpu:
            bad = [f for f in self.cpu_flavors if f not in CPU_FLAVORS]
            if bad or not self.cpu_flavors:
                raise ConfigurationError(f"--cpu-flavor must be one of {', '.join(CPU_FLAVORS)}"
                                         + (f", not {', '.join(bad)}" if bad else ""))
            if not 1 <= self.vcpu_count <= 64:
                raise ConfigurationError("--vcpus must be between 1 and 64")
        elif not self.gpu_type_ids():
            raise ConfigurationError("give at least one GPU type (--gpu)")


@dataclass
class Step:
    action: str
    detail: str
    body: dict[str, Any] | None = None
    command: list[str] | None = None


@dataclass
class DeployPlan:
    options: DeployOptions
    steps: list[Step]
    template_id: str | None
    endpoint_id: str | None
    #: set when the plan could not read the account (no key): creates may really be updates
    unchecked: str | None = None


@dataclass
class DeployResult:
    endpoint_id: str
    template_id: str
    created: list[str]
    updated: list[str]


def docker_available(docker: str = "docker") -> bool:
    """True when the docker CLI exists and its engine answers (`docker info`)."""
    if shutil.which(docker) is None:
        return False
    try:
        return subprocess.run([docker, "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class RunPodDeployer:
    """Plans and applies a deploy. ``transport`` and ``docker`` are injectable for tests and dry runs."""

    def __init__(
        self,
        api_key: SecretStr | str | None,
        rest_url: str = "https://rest.runpod.io/v1",
        *,
        transport: httpx.BaseTransport | None = None,
        docker: str = "docker",
        runner: Runner | None = None,
    ) -> None:
        key = api_key if isinstance(api_key, SecretStr) or api_key is None else SecretStr(api_key)
        self._key = key
        self.rest_url = rest_url.rstrip("/")
        self._transport = transport
        self.docker = docker
        self._run = runner or _run_command

    def __repr__(self) -> str:
        return f"<RunPodDeployer {self.rest_url}>"

    # -- REST --------------------------------------------------------------------------
    def _client(self) -> httpx.Client:
        if self._key is None:
            raise ConfigurationError("deploying to RunPod needs an API key: set RUNPOD_API_KEY")
        return httpx.Client(base_url=self.rest_url + "/", transport=self._transport, timeout=60,
                            headers={"Authorization": f"Bearer {self._key.get_secret_value()}"})

    def _rest(self, client: httpx.Client, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            resp = client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"RunPod's REST API is unreachable: {type(exc).__name__}: {exc}",
                                      provider="runpod") from None
        if resp.status_code in (401, 403):
            raise AuthenticationFailed(f"RunPod rejected the API key (HTTP {resp.status_code})", provider="runpod",
                                       status_code=resp.status_code)
        if resp.status_code == 404:
            return None
        if resp.status_code >= 400:
            raise ProviderError(f"RunPod refused {method} /{path} (HTTP {resp.status_code}): {resp.text[:300]}",
                                provider="runpod", retryable=resp.status_code >= 500, status_code=resp.status_code)
        return resp.json() if resp.content else None

    # -- plan --------------------------------------------------------------------------
    def plan(self, options: DeployOptions, *, build: bool | None = None, dry_run: bool = False) -> DeployPlan:
        """What a deploy would do. A dry run needs no image (the plan shows where it goes) and no key."""
        options.validate()
        if not options.image:
            if not dry_run:
                raise ConfigurationError(
                    "give the image to deploy with --image registry/user/broker-runpod:TAG ([runpod] image); "
                    "it is built and pushed there when docker runs here, else it must already be pushed")
            options.image = NO_IMAGE
        steps = self._image_steps(options, build) if options.image != NO_IMAGE else []
        template_body = self.template_body(options)
        endpoint_body = self.endpoint_body(options)
        template_id = endpoint_id = None
        unchecked = None
        if self._key is None:
            unchecked = "no RUNPOD_API_KEY: could not look for an existing template and endpoint"
        else:
            with self._client() as client:
                endpoint = self._find_endpoint(client, options)
                template = self._find_template(client, options, endpoint)
            template_id = template["id"] if template else None
            endpoint_id = endpoint["id"] if endpoint else None
        if template_id:
            update = {k: template_body[k] for k in ("imageName", "env", "containerDiskInGb")}
            steps.append(Step("update template", f"{template_id} -> {options.image}", update))
        else:
            steps.append(Step("create template", template_body["name"], template_body))
        endpoint_body = {**endpoint_body, "templateId": template_id or "<new template>"}
        if endpoint_id:
            steps.append(Step("update endpoint", f"{endpoint_id} ({options.name}: {options.summary()})", endpoint_body))
        else:
            steps.append(Step("create endpoint", f"{options.name} ({options.summary()})", endpoint_body))
        return DeployPlan(options, steps, template_id, endpoint_id, unchecked)

    def _image_steps(self, options: DeployOptions, build: bool | None) -> list[Step]:
        want = options.build if build is None else build
        if want is False:
            return []
        if want is None and not docker_available(self.docker):
            return []  # no engine here: the image must already be pushed
        root = repo_root()
        for dockerfile in ("containers/base.Dockerfile", "containers/runpod.Dockerfile"):
            if not (root / dockerfile).is_file():
                raise ConfigurationError(f"cannot build: {root / dockerfile} is missing (build from a checkout)")
        d = self.docker
        platform = ["--platform", "linux/amd64"]  # RunPod's GPU hosts
        base = [d, "build", *platform, "-f", "containers/base.Dockerfile", "-t", options.base_image, "."]
        args = [f"BASE_IMAGE={options.base_image}", f"BROKER_ENGINE={options.engine}",
                f"BROKER_VOICE={options.voice or ''}", f"BROKER_RUNPOD_MODE={options.mode}"]
        image = [d, "build", *platform, "-f", "containers/runpod.Dockerfile",
                 *[x for a in args for x in ("--build-arg", a)], "-t", str(options.image), "."]
        return [
            Step("build", f"base image {options.base_image}", command=base),
            Step("build", f"worker image {options.image}", command=image),
            Step("push", str(options.image), command=[d, "push", str(options.image)]),
        ]

    def template_body(self, options: DeployOptions) -> dict[str, Any]:
        env = {"BROKER_ENGINES__DEFAULT": options.engine, "BROKER_RUNPOD_MODE": options.mode}
        if options.voice:
            env["BROKER_ENGINES__PIPER_VOICE"] = options.voice
        return {
            "name": f"{options.name}-template",
            "imageName": options.image,
            "isServerless": True,
            "category": "CPU" if options.cpu else "NVIDIA",
            "containerDiskInGb": options.container_disk_gb,
            "volumeInGb": 0,
            "ports": [],
            "env": env,
        }

    def endpoint_body(self, options: DeployOptions) -> dict[str, Any]:
        compute: dict[str, Any] = (
            {"computeType": "CPU", "cpuFlavorIds": list(options.cpu_flavors), "vcpuCount": options.vcpu_count}
            if options.cpu else {"computeType": "GPU", "gpuTypeIds": options.gpu_type_ids(), "gpuCount": 1})
        return {
            "name": options.name,
            **compute,
            "workersMin": options.workers_min,
            "workersMax": options.workers_max,
            "idleTimeout": options.idle_timeout_s,
            "flashboot": options.flashboot,
            "executionTimeoutMs": int(options.execution_timeout_s * 1000),
        }

    def _find_endpoint(self, client: httpx.Client, options: DeployOptions) -> dict[str, Any] | None:
        if options.endpoint_id:
            found = self._rest(client, "GET", f"endpoints/{options.endpoint_id}")
            if found:
                return dict(found)
        matches = [e for e in self._rest(client, "GET", "endpoints") or [] if e.get("name") == options.name]
        if len(matches) > 1:
            ids = ", ".join(e["id"] for e in matches)
            raise ConfigurationError(f"{len(matches)} RunPod endpoints are named {options.name!r} ({ids}); "
                                     "set [runpod] endpoint_id to the one to update")
        return dict(matches[0]) if matches else None

    def _find_template(self, client: httpx.Client, options: DeployOptions,
                       endpoint: dict[str, Any] | None) -> dict[str, Any] | None:
        if endpoint and endpoint.get("templateId"):
            found = self._rest(client, "GET", f"templates/{endpoint['templateId']}")
            if found:
                return dict(found)
        name = f"{options.name}-template"
        for template in self._rest(client, "GET", "templates") or []:
            if template.get("name") == name:
                return dict(template)
        return None

    # -- apply -------------------------------------------------------------------------
    def apply(self, plan: DeployPlan, log: Callable[[str], None] = lambda _: None) -> DeployResult:
        created: list[str] = []
        updated: list[str] = []
        template_id, endpoint_id = plan.template_id, plan.endpoint_id
        for step in plan.steps:
            if step.command is not None:
                log(f"{step.action}: {step.detail}")
                code = self._run(step.command)
                if code != 0:
                    raise ProviderError(f"`{' '.join(step.command[:3])} ...` failed with exit code {code}",
                                        provider="runpod", retryable=False)
        with self._client() as client:
            body = self.template_body(plan.options)
            if template_id:
                update = {k: body[k] for k in ("imageName", "env", "containerDiskInGb")}
                self._rest(client, "PATCH", f"templates/{template_id}", update)
                updated.append(f"template {template_id}")
            else:
                template_id = str(self._rest(client, "POST", "templates", body)["id"])
                created.append(f"template {template_id}")
            log(f"template {template_id} ({body['name']}) -> {plan.options.image}")
            endpoint = {**self.endpoint_body(plan.options), "templateId": template_id}
            if endpoint_id:
                self._rest(client, "PATCH", f"endpoints/{endpoint_id}", endpoint)
                updated.append(f"endpoint {endpoint_id}")
            else:
                endpoint_id = str(self._rest(client, "POST", "endpoints", endpoint)["id"])
                created.append(f"endpoint {endpoint_id}")
            hardware = endpoint.get("cpuFlavorIds") or endpoint.get("gpuTypeIds") or []
            log(f"endpoint {endpoint_id} ({plan.options.name}) on {', '.join(hardware)}")
        return DeployResult(endpoint_id, template_id, created, updated)


def _run_command(command: Sequence[str]) -> int:
    return subprocess.run(list(command), cwd=repo_root()).returncode


# -- the config file -------------------------------------------------------------------
def write_endpoint_id(path: Path, endpoint_id: str, endpoint: str | None = None,
                      options: DeployOptions | None = None) -> Path:
    """Record the deployed endpoint in the TOML config at ``path``, keeping everything else as it was.

    ``endpoint`` None (or "runpod"): ``[runpod] endpoint_id``. A name: the table ``[endpoints.NAME]``
    with kind, endpoint_id and what routing needs to know of it (hardware, engines, workers_max); and
    when the file lists ``manager.providers`` the name is added, so the new endpoint is routed.
    """
    from broker.deploy.configfile import record_endpoint

    values: dict[str, Any] = {"endpoint_id": endpoint_id}
    named: dict[str, Any] = {}
    if options is not None:
        named = {"hardware": options.hardware, "engines": [options.engine], "workers_max": options.workers_max,
                 "compute_type": options.compute_type}
        if options.cpu and (endpoint is None or endpoint == "runpod"):
            # a CPU endpoint is priced as one, not as the GPU default
            values.update(hardware=options.hardware, compute_type="CPU")
    return record_endpoint(path, "runpod", endpoint, values, named)
