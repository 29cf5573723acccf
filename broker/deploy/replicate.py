"""`broker deploy replicate`: push the Cog model, then create or update a deployment, idempotently.

Replicate's API (https://replicate.com/docs/reference/http, read 2026-11-23):
``GET/POST /v1/models``, ``GET /v1/hardware``, ``GET/POST /v1/deployments``,
``GET/PATCH /v1/deployments/{owner}/{name}`` (a PATCH makes a new release). Pushing the
image is not an API call: it needs the Cog CLI and Docker (``cog push r8.im/<owner>/<model>``
from the model folder, https://cog.run/deploy). The model folder is ``handlers/replicate``
plus this package and its requirements, staged into one build context.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from broker.errors import AuthenticationFailed, ConfigurationError, InvalidRequest, ProviderUnavailable
from broker.settings import ReplicateSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
HANDLER_DIR = REPO_ROOT / "handlers" / "replicate"


@dataclass
class DeployPlan:
    model: str
    deployment: str
    hardware: str
    min_instances: int
    max_instances: int
    version: str | None = None
    push: bool = True
    stage_dir: Path = Path("build/replicate")


@dataclass
class DeployResult:
    #: created | updated | unchanged (or "would ..." in a dry run)
    action: str
    deployment: str
    version: str | None
    steps: list[str] = field(default_factory=list)
    config_path: Path | None = None


class ReplicateDeployer:
    """Each step is idempotent; ``dry_run`` makes only read calls and writes nothing."""

    def __init__(self, settings: ReplicateSettings, *, dry_run: bool = False,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.settings = settings
        self.dry_run = dry_run
        token = settings.api_token.get_secret_value() if settings.api_token else None
        if token is None and not dry_run:
            raise ConfigurationError("deploying to Replicate needs an API token: set REPLICATE_API_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.online = token is not None
        self._http = httpx.Client(base_url=settings.base_url.rstrip("/"), headers=headers, transport=transport,
                                  timeout=30.0)
        self.steps: list[str] = []

    def close(self) -> None:
        self._http.close()

    def owner(self) -> str | None:
        return str(self._get("/account")["username"]) if self.online else None

    def run(self, plan: DeployPlan) -> DeployResult:
        if self.online:
            skus = [h["sku"] for h in self._get("/hardware")]
            if plan.hardware not in skus:
                raise InvalidRequest("hardware", f"unknown SKU {plan.hardware!r}; choose one of {', '.join(skus)}")
        if not 0 <= plan.min_instances <= plan.max_instances or plan.max_instances < 1:
            raise InvalidRequest("instances", "need 0 <= min_instances <= max_instances and max_instances >= 1")
        self._ensure_model(plan)
        version = plan.version or self._pushed_version(plan)
        action = self._ensure_deployment(plan, version)
        return DeployResult(action=action, deployment=plan.deployment, version=version, steps=self.steps)

    # -- steps -------------------------------------------------------------------------
    def _ensure_model(self, plan: DeployPlan) -> None:
        if not self.online:
            self.steps.append(f"create model {plan.model} (private, {plan.hardware}) unless it exists")
            return
        if self._get(f"/models/{plan.model}", missing_ok=True) is not None:
            self.steps.append(f"model {plan.model} exists")
            return
        owner, _, name = plan.model.partition("/")
        self._write("POST", "/models", f"create model {plan.model} (private, {plan.hardware})",
                    json={"owner": owner, "name": name, "visibility": "private", "hardware": plan.hardware})

    def _pushed_version(self, plan: DeployPlan) -> str | None:
        image = f"r8.im/{plan.model}"
        if plan.push:
            if self.dry_run:
                self.steps.append(f"stage the build context in {plan.stage_dir} and run `cog push {image}`")
                return None
            stage_build_context(plan.stage_dir)
            missing = missing_tools()
            if missing:
                raise ConfigurationError(
                    f"pushing the image needs the Cog CLI and Docker ({', '.join(missing)} not found). "
                    f"Install them (https://cog.run), then run:  cd {plan.stage_dir} && cog push {image}  "
                    f"and deploy that version with:  broker deploy replicate --no-push"
                )
            self.steps.append(f"cog push {image}")
            subprocess.run(["cog", "push", image], cwd=plan.stage_dir, check=True)
        latest = (self._get(f"/models/{plan.model}", missing_ok=True) or {}).get("latest_version") if self.online \
            else None
        if latest is None:
            if self.dry_run:
                return None
            raise ConfigurationError(
                f"model {plan.model} has no version yet; push one:  cd {plan.stage_dir} && cog push {image}"
            )
        self.steps.append(f"use version {latest['id']}")
        return str(latest["id"])

    def _ensure_deployment(self, plan: DeployPlan, version: str | None) -> str:
        name = plan.deployment.partition("/")[2]
        wanted = {"version": version, "hardware": plan.hardware, "min_instances": plan.min_instances,
                  "max_instances": plan.max_instances}
        if not self.online:
            self.steps.append(f"create or update deployment {plan.deployment} ({_describe(wanted)})")
            return "would create or update"
        current = self._get(f"/deployments/{plan.deployment}", missing_ok=True)
        if current is None:
            self._write("POST", "/deployments", f"create deployment {plan.deployment} ({_describe(wanted)})",
                        json={"name": name, "model": plan.model, **wanted})
            return "would create" if self.dry_run else "created"
        release = current.get("current_release") or {}
        have = {"version": release.get("version"), **(release.get("configuration") or {})}
        changes = {k: v for k, v in wanted.items() if v is not None and have.get(k) != v}
        if not changes:
            self.steps.append(f"deployment {plan.deployment} already has {_describe(wanted)}")
            return "unchanged"
        self._write("PATCH", f"/deployments/{plan.deployment}", f"update deployment {plan.deployment} "
                    f"({_describe(changes)})", json=changes)
        return "would update" if self.dry_run else "updated"

    # -- HTTP --------------------------------------------------------------------------
    def _get(self, path: str, *, missing_ok: bool = False) -> Any:
        resp = self._call("GET", path)
        if resp.status_code == 404 and missing_ok:
            return None
        _check(resp, f"GET {path}")
        return resp.json()

    def _write(self, method: str, path: str, step: str, **kwargs: Any) -> None:
        if self.dry_run:
            self.steps.append(f"would {step}  [{method} /v1{path}]")
            return
        _check(self._call(method, path, **kwargs), step)
        self.steps.append(step)

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ProviderUnavailable(f"cannot reach Replicate at {self.settings.base_url}: "
                                      f"{type(exc).__name__}", provider="replicate") from None


def _check(resp: httpx.Response, what: str) -> None:
    if resp.status_code < 400:
        return
    try:
        detail = resp.json().get("detail") or resp.text
    except ValueError:
        detail = resp.text
    message = f"Replicate refused to {what} ({resp.status_code}): {detail}"
    if resp.status_code in (401, 403):
        raise AuthenticationFailed(message, provider="replicate", status_code=resp.status_code)
    raise ProviderUnavailable(message, provider="replicate", status_code=resp.status_code, retryable=False)


def _describe(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items() if v is not None)


def missing_tools() -> list[str]:
    """Which of the Cog CLI and a working Docker are absent."""
    missing = [] if shutil.which("cog") else ["cog"]
    docker = shutil.which("docker")
    if docker is None:
        missing.append("docker")
    else:
        try:
            subprocess.run([docker, "info"], capture_output=True, timeout=20, check=True)
        except (subprocess.SubprocessError, OSError):
            missing.append("a running Docker daemon")
    return missing


def stage_build_context(dest: Path) -> Path:
    """handlers/replicate + the broker package + requirements.txt: what `cog push` builds."""
    if not (HANDLER_DIR / "cog.yaml").is_file():
        raise ConfigurationError(f"no Cog model at {HANDLER_DIR}; deploy from a broker source checkout")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(HANDLER_DIR, dest, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO_ROOT / "broker", dest / "broker", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (dest / "requirements.txt").write_text("\n".join(image_requirements()) + "\n")
    return dest


def image_requirements() -> list[str]:
    """broker's own dependencies plus the [local] engines (the image runs them on the GPU), plus
    ``BROKER_EXTRA_PIP`` (your own engines, as EXTRA_PIP does for the Dockerfiles)."""
    import shlex

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extra = shlex.split(os.environ.get("BROKER_EXTRA_PIP", ""))
    return [*project["dependencies"], *project["optional-dependencies"]["local"], *extra]


def endpoint_section(settings: Any, endpoint: str | None) -> Any:
    """What to deploy from (see ``configfile.deploy_settings``): a new named endpoint starts from the
    [replicate] section's settings, without their deployment."""
    from broker.deploy.configfile import deploy_settings

    return deploy_settings(settings, "replicate", "Replicate", endpoint,
                           {"deployment": None, "model": None, "version": None})


def write_config(path: Path, endpoint: str | None, values: dict[str, Any]) -> Path:
    """Set ``values`` in ``[replicate]`` of the TOML config, or in ``[endpoints.NAME]`` (see
    ``configfile.record_endpoint``), keeping its comments and layout."""
    from broker.deploy.configfile import record_endpoint

    return record_endpoint(path, "replicate", endpoint, values)
