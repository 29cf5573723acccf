"""`broker deploy cloudrun`: a Cloud Run (v2 Admin API) Service running the worker on an NVIDIA L4.

The file is the body of ``POST https://run.googleapis.com/v2/projects/P/locations/L/services?serviceId=NAME``
(``PATCH .../services/NAME`` to update), in the v2 ``Service`` shape (google.cloud.run.v2, read
2026-12-01 from the googleapis protos as shipped in ``google-cloud-run`` 0.16 and from
cloud.google.com/run/docs/configuring/services/gpu; validated in tests by parsing it into the
``run_v2.Service`` proto with unknown fields rejected):

- GPU: ``template.nodeSelector.accelerator = "nvidia-l4"`` and ``resources.limits["nvidia.com/gpu"] = "1"``
  (one GPU per instance), which Cloud Run requires with at least 4 CPU and 16 GiB, instance-based billing
  (``cpuIdle: false``: the CPU stays allocated) and, without zonal-redundancy quota,
  ``gpuZonalRedundancyDisabled``;
- the key: an env var whose ``valueSource.secretKeyRef`` names a Secret Manager secret;
- probes: liveness on /health; the startup probe on /ready (Cloud Run sends no traffic before it passes,
  and allows it at most 240 s: failureThreshold × periodSeconds), and a readiness probe on /ready, which
  is a Preview feature (cloud.google.com/run/docs/configuring/healthchecks, 2026-12-01), hence
  ``launchStage: BETA``;
- presets: a read-only Cloud Storage volume mounted at /avatars;
- scaling: min/max instances, and ``maxInstanceRequestConcurrency`` = job slots + waiting room, so Cloud
  Run starts another instance instead of queueing past what one worker accepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.deploy.fleet import API_KEY_ENV, AVATARS_DIR, HEALTH_PATH, PORT, READY_PATH, Bundle, FleetOptions
from broker.errors import InvalidRequest

ACCELERATOR = "nvidia-l4"
#: Cloud Run's floor for an L4 instance (cloud.google.com/run/docs/configuring/services/gpu, 2026-12-01)
L4_MIN_CPU = 4.0
L4_MIN_MEMORY_GIB = 16.0
#: Cloud Run's cap on a startup probe's failureThreshold × periodSeconds
STARTUP_PROBE_MAX_S = 240


@dataclass
class CloudRunOptions(FleetOptions):
    project: str = "my-project"
    region: str = "europe-west4"
    #: the service account the instances run as (needs secretmanager.secretAccessor on the key)
    service_account: str | None = None
    #: the GPU is in one zone unless the project has zonal-redundancy quota
    gpu_zonal_redundancy: bool = False
    min_replicas: int = 0

    def check(self) -> None:
        super().check()
        if self.gpus > 1:
            raise InvalidRequest("gpus", "Cloud Run attaches at most one GPU per instance")
        if self.gpus and (self.cpu < L4_MIN_CPU or self.memory_gib < L4_MIN_MEMORY_GIB):
            raise InvalidRequest("cpu", f"an {ACCELERATOR} instance needs at least {L4_MIN_CPU:g} CPU and "
                                        f"{L4_MIN_MEMORY_GIB:g} GiB (got {self.cpu:g} CPU, {self.memory_gib:g} GiB)")
        if self.cpu > 1 and not float(self.cpu).is_integer():
            raise InvalidRequest("cpu", "Cloud Run takes whole CPUs above 1")
        if self.avatars and self.avatars.startswith("gs://"):
            self.avatars = self.avatars.removeprefix("gs://").rstrip("/")


def _probe(path: str, *, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": PORT}, "periodSeconds": period, "timeoutSeconds": 5,
            "failureThreshold": failures}


def service(opts: CloudRunOptions) -> dict[str, Any]:
    limits = {"cpu": f"{opts.cpu:g}", "memory": f"{opts.memory_gib:g}Gi"}
    if opts.gpus:
        limits["nvidia.com/gpu"] = "1"
    worker: dict[str, Any] = {
        "name": "worker",
        "image": opts.image,
        "args": opts.serve_args(),
        "ports": [{"name": "http1", "containerPort": PORT}],
        "env": [
            {"name": API_KEY_ENV, "valueSource": {"secretKeyRef": {"secret": opts.api_key_secret,
                                                                   "version": "latest"}}},
            *({"name": k, "value": v} for k, v in opts.plain_env().items()),
        ],
        # GPU services bill the whole instance life anyway; keeping the CPU allocated is required.
        "resources": {"limits": limits, "cpuIdle": not opts.gpus, "startupCpuBoost": True},
        "startupProbe": _probe(READY_PATH, period=10, failures=STARTUP_PROBE_MAX_S // 10),
        "livenessProbe": _probe(HEALTH_PATH, period=15, failures=4),
        "readinessProbe": _probe(READY_PATH, period=5, failures=2),
    }
    template: dict[str, Any] = {
        "labels": {"app": opts.name, "part-of": "broker"},
        "scaling": {"minInstanceCount": opts.min_replicas, "maxInstanceCount": opts.max_replicas},
        "maxInstanceRequestConcurrency": opts.concurrency + opts.max_waiting,
        "timeout": f"{min(opts.job_timeout_s, 3600)}s",
        "executionEnvironment": "EXECUTION_ENVIRONMENT_GEN2",
        "containers": [worker],
    }
    if opts.gpus:
        template["nodeSelector"] = {"accelerator": ACCELERATOR}
        template["gpuZonalRedundancyDisabled"] = not opts.gpu_zonal_redundancy
    if opts.service_account:
        template["serviceAccount"] = opts.service_account
    if opts.avatars:
        worker["volumeMounts"] = [{"name": "avatars", "mountPath": AVATARS_DIR}]
        template["volumes"] = [{"name": "avatars", "gcs": {"bucket": opts.avatars, "readOnly": True}}]
    return {
        "labels": {"app": opts.name, "part-of": "broker"},
        "ingress": "INGRESS_TRAFFIC_ALL",
        # readiness probes are Preview on Cloud Run: a service using one must say BETA
        "launchStage": "BETA",
        # The worker checks its own API key; Cloud Run IAM would need a Google identity token on every call.
        "invokerIamDisabled": True,
        "scaling": {"minInstanceCount": opts.min_replicas},
        "template": template,
    }


def bundle(opts: CloudRunOptions) -> Bundle:
    opts.check()
    base = f"https://run.googleapis.com/v2/projects/{opts.project}/locations/{opts.region}/services"
    auth = '-H "Authorization: Bearer $(gcloud auth print-access-token)" -H "Content-Type: application/json"'
    return Bundle(
        platform="cloudrun",
        files={"service.json": service(opts)},
        commands=[
            f'printf %s "${API_KEY_ENV}" | gcloud secrets create {opts.api_key_secret} --project {opts.project} '
            "--data-file=-",
            f"curl -X POST {auth} --data @service.json '{base}?serviceId={opts.name}'   # first time",
            f"curl -X PATCH {auth} --data @service.json '{base}/{opts.name}'   # later updates",
            f"gcloud run services describe {opts.name} --project {opts.project} --region {opts.region} "
            "--format 'value(status.url)'",
        ],
        notes=[f"{ACCELERATOR} GPUs need the 'Total Nvidia L4 GPU allocation' quota in {opts.region}",
               "the service account needs roles/secretmanager.secretAccessor on the key's secret"],
    )


__all__ = ["ACCELERATOR", "L4_MIN_CPU", "L4_MIN_MEMORY_GIB", "STARTUP_PROBE_MAX_S", "CloudRunOptions", "bundle",
           "service"]
