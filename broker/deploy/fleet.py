"""What every self-hosted platform's manifests share: the worker container, its probes, limits and secret.

``broker deploy kubernetes|ecs|cloudrun|aci`` write manifests for the platform's own tools (kubectl,
the AWS CLI, the Cloud Run REST API, the Azure CLI) to apply; broker never calls those platforms
itself. Each platform module (``broker.deploy.kubernetes``, ``.ecs``, ``.cloudrun``, ``.aci``) turns
its options into a ``Bundle``: named files (YAML or JSON documents) and the commands that apply them.

The worker image is ``containers/worker.Dockerfile``: its entrypoint is ``broker worker serve --host
0.0.0.0 --port 8000``; the manifests add the serving flags (presets folder, job slots, waiting room).
The API key always reaches the container from the platform's secret store (or, on ACI, a secure
variable filled at deploy time from the operator's environment): never a literal in a manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.errors import InvalidRequest

#: the variable `broker worker serve` reads its key from (``--api-key`` envvar)
API_KEY_ENV = "BROKER_WORKER_API_KEY"
PORT = 8000
HEALTH_PATH = "/health"
READY_PATH = "/ready"
METRICS_PATH = "/metrics"
AVATARS_DIR = "/avatars"
#: the queue-depth gauge the worker exports on /metrics (``broker.worker.metrics``)
QUEUE_DEPTH_METRIC = "broker_worker_queue_depth"
#: the entrypoint of containers/worker.Dockerfile, for platforms whose "command" replaces it (ACI)
ENTRYPOINT = ("broker", "worker", "serve", "--host", "0.0.0.0", "--port", str(PORT))


@dataclass
class FleetOptions:
    """Options every platform takes; platform modules subclass it with their own."""

    name: str = "broker-worker"
    #: a pushed image built from containers/worker.Dockerfile
    image: str = "broker-worker:latest"
    gpus: int = 1
    #: vCPUs and memory of one worker (GPU platforms have minimums: Cloud Run L4 needs 4 CPU / 16 GiB)
    cpu: float = 4.0
    memory_gib: float = 16.0
    min_replicas: int = 1
    max_replicas: int = 4
    #: jobs one worker runs at once (``--concurrency``) and may hold waiting (``--max-waiting``)
    concurrency: int = 1
    max_waiting: int = 8
    #: scale out when a worker's queue (running + waiting) averages above this
    target_queue_depth: float = 2.0
    #: speech engine loaded before /ready
    engine: str = "piper"
    #: the secret holding the API key (a name, or on ECS an ARN); the key itself is never given here
    api_key_secret: str = "broker-worker-api-key"
    #: where the preset avatars come from (platform-specific: a claim, a file system, a bucket, a share)
    avatars: str | None = None
    #: seconds the longest job may take (request timeouts, graceful shutdown)
    job_timeout_s: int = 900
    labels: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        """Bad options stop here (exit 2 on the CLI), before anything is written."""
        if not _dns_label(self.name):
            raise InvalidRequest("name", f"{self.name!r} must be lowercase letters, digits and '-', at most 40")
        if not self.image.strip() or any(c.isspace() for c in self.image):
            raise InvalidRequest("image", "give the pushed image, e.g. registry.example.com/broker-worker:0.1")
        if self.gpus < 0:
            raise InvalidRequest("gpus", "must be 0 or more")
        if self.cpu <= 0 or self.memory_gib <= 0:
            raise InvalidRequest("cpu", "cpu and memory must be positive")
        if self.min_replicas < 0 or self.max_replicas < 1 or self.min_replicas > self.max_replicas:
            raise InvalidRequest("replicas",
                                 f"need 0 <= min ({self.min_replicas}) <= max ({self.max_replicas}), max >= 1")
        if self.concurrency < 1 or self.max_waiting < 0:
            raise InvalidRequest("concurrency", "concurrency must be >= 1 and max-waiting >= 0")
        if self.target_queue_depth <= 0:
            raise InvalidRequest("target_queue_depth", "must be positive")
        if self.job_timeout_s < 1:
            raise InvalidRequest("job_timeout_s", "must be at least 1 s")
        if not self.api_key_secret.strip():
            raise InvalidRequest("api_key_secret", "name the secret that holds the worker's API key")

    def serve_args(self) -> list[str]:
        """Flags after the image's entrypoint."""
        args = ["--concurrency", str(self.concurrency), "--max-waiting", str(self.max_waiting),
                "--max-body-mb", "64", "--log-level", "info"]
        if self.avatars:
            args[:0] = ["--avatars", AVATARS_DIR]
        return args

    def plain_env(self) -> dict[str, str]:
        """Non-secret environment of the worker container."""
        return {"BROKER_ENGINES__DEFAULT": self.engine, "PYTHONUNBUFFERED": "1"}

    def all_labels(self) -> dict[str, str]:
        return {"app.kubernetes.io/name": self.name, "app.kubernetes.io/part-of": "broker", **self.labels}


def _dns_label(name: str) -> bool:
    return 0 < len(name) <= 40 and name[0].isalpha() and name[-1].isalnum() and all(
        c.islower() or c.isdigit() or c == "-" for c in name)


@dataclass
class Bundle:
    """Manifests for one platform: file name → document (or list of YAML documents), and how to apply them."""

    platform: str
    files: dict[str, Any]
    commands: list[str]
    notes: list[str] = field(default_factory=list)

    def text(self, filename: str) -> str:
        doc = self.files[filename]
        if filename.endswith(".json"):
            return json.dumps(doc, indent=2) + "\n"
        import yaml

        docs = doc if isinstance(doc, list) else [doc]
        return yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False)

    def stdout(self) -> str:
        """Everything for ``--dry-run``: YAML files as one multi-document stream (each headed by its file
        name in a comment), JSON files as one JSON object keyed by file name."""
        if all(name.endswith(".json") for name in self.files):
            return json.dumps(self.files, indent=2) + "\n"
        return "---\n".join(f"# {name}\n{self.text(name)}" for name in self.files)

    def write(self, directory: Path) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for name in self.files:
            path = directory / name
            path.write_text(self.text(name), encoding="utf-8")
            written.append(path)
        return written


__all__ = ["API_KEY_ENV", "AVATARS_DIR", "ENTRYPOINT", "HEALTH_PATH", "METRICS_PATH", "PORT", "QUEUE_DEPTH_METRIC",
           "READY_PATH", "Bundle", "FleetOptions"]
