"""`broker deploy kubernetes`: a GPU worker Deployment, its Service, and an HPA on the workers' queue depth.

Shapes (checked 2026-12-01 against the Kubernetes API reference, kubernetes.io/docs/reference/kubernetes-api/:
apps/v1 Deployment, core/v1 Service and PersistentVolumeClaim, autoscaling/v2 HorizontalPodAutoscaler; and
validated in tests with ``kubernetes-validate`` 1.37 in strict mode):

- GPUs are the NVIDIA device plugin's extended resource ``nvidia.com/gpu`` (a limit; requests default to
  it), with the usual ``nvidia.com/gpu:NoSchedule`` toleration of GPU node pools;
- the key comes from a Secret the operator creates (``kubectl create secret generic``) through
  ``secretKeyRef``; the manifests never carry it;
- ``/health`` is the liveness probe, ``/ready`` the readiness probe, and a startup probe on ``/health``
  gives the engines time to load before liveness counts;
- the HPA scales on the Pods metric ``broker_worker_queue_depth`` (average per pod), which the custom
  metrics API serves once Prometheus scrapes ``/metrics`` and prometheus-adapter exposes it
  (docs/SELF_HOSTED.md has the scrape and adapter rules).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.deploy.fleet import (
    API_KEY_ENV,
    AVATARS_DIR,
    HEALTH_PATH,
    PORT,
    QUEUE_DEPTH_METRIC,
    READY_PATH,
    Bundle,
    FleetOptions,
)
from broker.errors import InvalidRequest

GPU_RESOURCE = "nvidia.com/gpu"
#: the key inside the Secret that holds the worker's API key
SECRET_KEY = "api-key"


@dataclass
class KubernetesOptions(FleetOptions):
    namespace: str = "default"
    #: an existing ReadOnlyMany PersistentVolumeClaim with the avatar images; None with ``avatars`` set to
    #: "pvc" = create one named NAME-avatars
    storage_class: str | None = None
    #: nodeSelector for GPU nodes, e.g. {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    node_selector: dict[str, str] | None = None


def _quantity_cpu(cpu: float) -> str:
    return str(int(cpu)) if float(cpu).is_integer() else f"{int(cpu * 1000)}m"


def _quantity_mem(gib: float) -> str:
    return f"{int(gib)}Gi" if float(gib).is_integer() else f"{int(gib * 1024)}Mi"


def _probe(path: str, *, period: int, failures: int, timeout: int = 5) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "timeoutSeconds": timeout,
            "failureThreshold": failures}


def container(opts: KubernetesOptions) -> dict[str, Any]:
    limits: dict[str, str] = {"cpu": _quantity_cpu(opts.cpu), "memory": _quantity_mem(opts.memory_gib)}
    if opts.gpus:
        limits[GPU_RESOURCE] = str(opts.gpus)
    env: list[dict[str, Any]] = [
        {"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": opts.api_key_secret, "key": SECRET_KEY}}},
        *({"name": k, "value": v} for k, v in opts.plain_env().items()),
    ]
    spec: dict[str, Any] = {
        "name": "worker",
        "image": opts.image,
        "args": opts.serve_args(),
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": env,
        "resources": {"requests": {"cpu": limits["cpu"], "memory": limits["memory"]}, "limits": limits},
        # Engines load for tens of seconds on a cold node: up to 10 minutes before liveness counts.
        "startupProbe": _probe(HEALTH_PATH, period=10, failures=60),
        "livenessProbe": _probe(HEALTH_PATH, period=15, failures=4),
        "readinessProbe": _probe(READY_PATH, period=5, failures=2),
    }
    if opts.avatars:
        spec["volumeMounts"] = [{"name": "avatars", "mountPath": AVATARS_DIR, "readOnly": True}]
    return spec


def deployment(opts: KubernetesOptions) -> dict[str, Any]:
    labels = opts.all_labels()
    selector = {"app.kubernetes.io/name": opts.name}
    pod: dict[str, Any] = {
        "containers": [container(opts)],
        # A job in flight finishes before the pod goes (the worker drains on SIGTERM).
        "terminationGracePeriodSeconds": min(opts.job_timeout_s + 30, 3600),
    }
    if opts.gpus:
        pod["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    if opts.node_selector:
        pod["nodeSelector"] = dict(opts.node_selector)
    if opts.avatars:
        pod["volumes"] = [{"name": "avatars", "persistentVolumeClaim": {"claimName": _claim(opts), "readOnly": True}}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": opts.name, "namespace": opts.namespace, "labels": labels},
        "spec": {
            "replicas": max(opts.min_replicas, 1),
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }


def service(opts: KubernetesOptions) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": opts.name, "namespace": opts.namespace, "labels": opts.all_labels()},
        "spec": {"type": "ClusterIP", "selector": {"app.kubernetes.io/name": opts.name},
                 "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}]},
    }


def autoscaler(opts: KubernetesOptions) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": opts.name, "namespace": opts.namespace, "labels": opts.all_labels()},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": opts.name},
            # The HPA cannot scale to zero without an alpha feature gate: at least one worker stays up.
            "minReplicas": max(opts.min_replicas, 1),
            "maxReplicas": opts.max_replicas,
            "metrics": [{
                "type": "Pods",
                "pods": {"metric": {"name": QUEUE_DEPTH_METRIC},
                         "target": {"type": "AverageValue", "averageValue": _average(opts.target_queue_depth)}},
            }],
            # GPU nodes are slow to add and dear to keep: scale out at once, in only after 5 quiet minutes.
            "behavior": {
                "scaleUp": {"stabilizationWindowSeconds": 0,
                            "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}]},
                "scaleDown": {"stabilizationWindowSeconds": 300,
                              "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}]},
            },
        },
    }


def _average(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{int(value * 1000)}m"


def _claim(opts: KubernetesOptions) -> str:
    return f"{opts.name}-avatars" if opts.avatars == "pvc" else str(opts.avatars)


def avatars_claim(opts: KubernetesOptions) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "1Gi"}}}
    if opts.storage_class:
        spec["storageClassName"] = opts.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": _claim(opts), "namespace": opts.namespace, "labels": opts.all_labels()},
            "spec": spec}


def bundle(opts: KubernetesOptions) -> Bundle:
    opts.check()
    if opts.min_replicas < 1:
        raise InvalidRequest("min_replicas", "the Kubernetes HPA keeps at least 1 replica (scale to zero needs "
                                             "an alpha feature gate)")
    docs = [deployment(opts), service(opts), autoscaler(opts)]
    if opts.avatars == "pvc":
        docs.insert(0, avatars_claim(opts))
    ns = f" -n {opts.namespace}"
    return Bundle(
        platform="kubernetes",
        files={f"{opts.name}.yaml": docs},
        commands=[
            # the key on stdin, not in kubectl's arguments (which `ps` shows)
            f'printf %s "${API_KEY_ENV}" | kubectl{ns} create secret generic {opts.api_key_secret} '
            f"--from-file={SECRET_KEY}=/dev/stdin",
            f"kubectl{ns} apply -f {opts.name}.yaml",
            f"kubectl{ns} rollout status deployment/{opts.name}",
        ],
        notes=["the HPA needs the custom metrics API: Prometheus scraping /metrics (with the key) and "
               f"prometheus-adapter exposing {QUEUE_DEPTH_METRIC} (docs/SELF_HOSTED.md)"],
    )


__all__ = ["GPU_RESOURCE", "SECRET_KEY", "KubernetesOptions", "autoscaler", "bundle", "deployment", "service"]
