"""`broker deploy aci`: Azure Container Instances container groups (YAML for ``az container create --file``).

Shape: the ContainerGroup resource of the Microsoft.ContainerInstance REST API 2023-05-01, the version the
``azure-mgmt-containerinstance`` 10.1 models speak (read 2026-12-01 from those models and
learn.microsoft.com/azure/container-instances/container-instances-reference-yaml; validated in tests by
deserializing into ``ContainerGroup`` and serializing back unchanged):

- GPU: ``resources.requests.gpu = {count, sku}`` (SKUs K80 / P100 / V100 in this API version; GPU
  container groups are only offered in some regions);
- the key: a ``secureValue`` environment variable, written here as the placeholder
  ``${BROKER_WORKER_API_KEY}`` and filled from the operator's environment at deploy time
  (``envsubst < aci-0.yaml | az container create --file /dev/stdin``), so no file holds the key;
- probes: liveness GET /health, readiness GET /ready;
- presets: an Azure Files share mounted read-only at /avatars (its storage key is a placeholder too);
- scaling: ACI has no autoscaler, so one group is written per replica (``--min-replicas``); the broker
  ``http`` provider spreads jobs across their URLs as a pool (``http.urls``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.deploy.fleet import (
    API_KEY_ENV,
    AVATARS_DIR,
    ENTRYPOINT,
    HEALTH_PATH,
    PORT,
    READY_PATH,
    Bundle,
    FleetOptions,
)
from broker.errors import InvalidRequest

API_VERSION = "2023-05-01"
GPU_SKUS = ("K80", "P100", "V100")
#: filled by envsubst at deploy time; never a key in the file
STORAGE_KEY_ENV = "AZURE_STORAGE_KEY"


def placeholder(var: str) -> str:
    return "${" + var + "}"


@dataclass
class ACIOptions(FleetOptions):
    resource_group: str = "broker"
    location: str = "eastus"
    gpu_sku: str = "V100"
    #: Azure Files: the storage account holding the ``avatars`` share
    storage_account: str | None = None
    #: DNS label prefix: each group answers at <prefix>-<i>.<location>.azurecontainer.io
    dns_prefix: str | None = None
    min_replicas: int = 2

    def check(self) -> None:
        super().check()
        if self.gpus and self.gpu_sku not in GPU_SKUS:
            raise InvalidRequest("gpu_sku", f"ACI GPU SKUs are {', '.join(GPU_SKUS)}")
        if self.avatars and not self.storage_account:
            raise InvalidRequest("storage_account", "an Azure Files share needs its storage account")
        if self.min_replicas < 1:
            raise InvalidRequest("min_replicas", "ACI groups do not scale to zero: give at least 1")


def container_group(opts: ACIOptions, index: int) -> dict[str, Any]:
    name = f"{opts.name}-{index}"
    requests: dict[str, Any] = {"cpu": float(opts.cpu), "memoryInGB": float(opts.memory_gib)}
    if opts.gpus:
        requests["gpu"] = {"count": opts.gpus, "sku": opts.gpu_sku}
    env = [{"name": API_KEY_ENV, "secureValue": placeholder(API_KEY_ENV)},
           *({"name": k, "value": v} for k, v in opts.plain_env().items())]
    worker: dict[str, Any] = {
        # ACI's command replaces the image's entrypoint, so it is spelled out whole.
        "command": [*ENTRYPOINT, *opts.serve_args()],
        "environmentVariables": env,
        "image": opts.image,
        "livenessProbe": {"httpGet": {"path": HEALTH_PATH, "port": PORT, "scheme": "http"},
                          "initialDelaySeconds": 120, "periodSeconds": 15, "failureThreshold": 4,
                          "timeoutSeconds": 5},
        "ports": [{"port": PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": READY_PATH, "port": PORT, "scheme": "http"},
                           "initialDelaySeconds": 10, "periodSeconds": 5, "failureThreshold": 2,
                           "timeoutSeconds": 5},
        "resources": {"requests": requests},
    }
    properties: dict[str, Any] = {
        "containers": [{"name": "worker", "properties": worker}],
        "ipAddress": {"ports": [{"port": PORT, "protocol": "TCP"}], "type": "Public",
                      "dnsNameLabel": f"{opts.dns_prefix or opts.name}-{index}"},
        "osType": "Linux",
        "restartPolicy": "Always",
        "sku": "Standard",
    }
    if opts.avatars:
        worker["volumeMounts"] = [{"mountPath": AVATARS_DIR, "name": "avatars", "readOnly": True}]
        properties["volumes"] = [{"azureFile": {"readOnly": True, "shareName": opts.avatars,
                                                "storageAccountKey": placeholder(STORAGE_KEY_ENV),
                                                "storageAccountName": opts.storage_account},
                                  "name": "avatars"}]
    return {
        "apiVersion": API_VERSION,
        "location": opts.location,
        "name": name,
        "properties": properties,
        "tags": dict(opts.all_labels()),
        "type": "Microsoft.ContainerInstance/containerGroups",
    }


def bundle(opts: ACIOptions) -> Bundle:
    opts.check()
    files = {f"aci-{i}.yaml": container_group(opts, i) for i in range(opts.min_replicas)}
    commands = [f"envsubst '${API_KEY_ENV} ${STORAGE_KEY_ENV}' < {name} | "
                f"az container create --resource-group {opts.resource_group} --file /dev/stdin"
                for name in files]
    urls = [f"http://{opts.dns_prefix or opts.name}-{i}.{opts.location}.azurecontainer.io:{PORT}"
            for i in range(opts.min_replicas)]
    return Bundle(
        platform="aci",
        files=files,
        commands=commands,
        notes=["ACI has no autoscaler: these groups run (and bill) until deleted",
               "route to them as one pool: [http] urls = [" + ", ".join(f'"{u}"' for u in urls) + "]"],
    )


__all__ = ["API_VERSION", "GPU_SKUS", "STORAGE_KEY_ENV", "ACIOptions", "bundle", "container_group", "placeholder"]
