"""`broker deploy modal`: deploy handlers/modal/app.py with the GPU, scaling and snapshot options chosen.

The deploy itself is Modal's own CLI (``python -m modal deploy``) in a subprocess: the app module reads
its options from ``BROKER_MODAL__*`` variables when imported, so the subprocess gets them in its
environment. Credentials are checked before anything touches the network, and the names (and web
URL) of what was deployed are written to the [modal] section of the broker config.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from broker.errors import ConfigurationError, InvalidRequest, ProviderError
from broker.settings import Settings

CLASS_NAME = "BrokerWorker"  # the class defined in handlers/modal/app.py
_WEB_URL = re.compile(r"https://[A-Za-z0-9.-]+\.modal\.run[^\s'\"<>)]*")

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def default_app_file() -> Path:
    """handlers/modal/app.py of the checkout broker runs from."""
    import broker

    return Path(broker.__file__).resolve().parent.parent / "handlers" / "modal" / "app.py"


@dataclass(frozen=True)
class ModalDeployPlan:
    app_name: str
    hardware: str
    min_containers: int
    max_containers: int
    scaledown_window_s: int
    memory_snapshot: bool
    timeout_s: int
    environment: str | None
    image: str | None
    app_file: Path
    class_name: str = CLASS_NAME

    def env(self) -> dict[str, str]:
        """The variables the app module reads at import (deploy time and in the container)."""
        values: dict[str, Any] = {
            "APP_NAME": self.app_name,
            "HARDWARE": self.hardware,
            "MIN_CONTAINERS": self.min_containers,
            "MAX_CONTAINERS": self.max_containers,
            "SCALEDOWN_WINDOW_S": self.scaledown_window_s,
            "MEMORY_SNAPSHOT": str(self.memory_snapshot).lower(),
            "TIMEOUT_S": self.timeout_s,
        }
        if self.image:
            values["IMAGE"] = self.image
        return {f"BROKER_MODAL__{k}": str(v) for k, v in values.items()}

    def command(self, python: str = sys.executable) -> list[str]:
        cmd = [python, "-m", "modal", "deploy", str(self.app_file), "--name", self.app_name]
        if self.environment:
            cmd += ["--env", self.environment]
        return cmd

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data["app_file"] = str(self.app_file)
        data["command"] = " ".join(self.command("python"))
        data["env"] = self.env()
        return data


def endpoint_section(settings: Settings, endpoint: str | None) -> Any:
    """What to deploy from (see ``configfile.deploy_settings``): a new named endpoint's app is named after it,
    so it does not replace the [modal] section's app."""
    from broker.deploy.configfile import deploy_settings

    return deploy_settings(settings, "modal", "Modal", endpoint, {"app_name": endpoint, "url": None})


def plan_from_settings(settings: Settings, *, endpoint: str | None = None, **overrides: Any) -> ModalDeployPlan:
    """The plan from the [modal] settings (or [endpoints.NAME]'s, ``endpoint``), with CLI overrides (None =
    keep the setting); checks the values."""
    m = endpoint_section(settings, endpoint)
    chosen = {k: v for k, v in overrides.items() if v is not None}
    fields: dict[str, Any] = {
        "app_name": m.app_name,
        "hardware": m.hardware,
        "min_containers": m.min_containers,
        "max_containers": m.max_containers,
        "scaledown_window_s": m.scaledown_window_s,
        "memory_snapshot": m.memory_snapshot,
        "timeout_s": m.timeout_s,
        "environment": m.environment,
        "image": m.image,
        "app_file": default_app_file(),
    }
    fields.update(chosen)
    fields["app_file"] = Path(fields["app_file"])
    plan = ModalDeployPlan(**fields)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", plan.app_name):
        raise InvalidRequest("app_name", "use letters, digits, '.', '-' and '_' (at most 64)")
    if not re.fullmatch(r"[A-Za-z0-9-]+(:\d+)?", plan.hardware):
        raise InvalidRequest("gpu", f"{plan.hardware!r} is not a Modal GPU type such as A10G, L40S or H100:2")
    if plan.min_containers < 0:
        raise InvalidRequest("min_containers", "must be >= 0")
    if plan.max_containers < 1 or plan.max_containers < plan.min_containers:
        raise InvalidRequest("max_containers", f"must be >= 1 and >= min_containers ({plan.min_containers})")
    if not 2 <= plan.scaledown_window_s <= 3600:
        raise InvalidRequest("scaledown_window", "Modal accepts 2 to 3600 seconds")
    if not 10 <= plan.timeout_s <= 86_400:
        raise InvalidRequest("timeout", "must be between 10 and 86400 seconds")
    if not plan.app_file.is_file():
        raise ConfigurationError(
            f"{plan.app_file} not found: run from a checkout of the broker repository or pass --app-file"
        )
    return plan


def check_credentials(settings: Settings) -> None:
    """Fail before any network call when the Modal SDK would have no token."""
    from broker.providers.modal import modal_token_configured

    if not modal_token_configured(settings):
        raise ConfigurationError(
            "no Modal credentials: run `modal token new` (it writes ~/.modal.toml) "
            "or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET"
        )


@dataclass
class ModalDeployResult:
    app_name: str
    class_name: str
    url: str | None
    output: str


def run_deploy(plan: ModalDeployPlan, *, runner: Runner = subprocess.run, timeout_s: float = 3600
               ) -> ModalDeployResult:
    """Run ``modal deploy`` with the plan's environment; the web URL is read from its output."""
    env = {**os.environ, **plan.env(), "NO_COLOR": "1", "COLUMNS": "400", "PYTHONUNBUFFERED": "1"}
    proc = runner(plan.command(), env=env, capture_output=True, text=True, timeout=timeout_s)
    output = (proc.stdout or "") + (proc.stderr or "")
    if proc.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise ProviderError(f"`modal deploy` failed (exit {proc.returncode}):\n{tail}", provider="modal",
                            retryable=False)
    urls = [u.rstrip(".,") for u in _WEB_URL.findall(output)]
    return ModalDeployResult(plan.app_name, plan.class_name, urls[-1] if urls else None, output)


def record(result: ModalDeployResult, path: Path, endpoint: str | None = None,
           plan: ModalDeployPlan | None = None) -> Path:
    """Write the deployed names (and URL) into [modal] of the config at ``path``, or into
    ``[endpoints.NAME]`` (with its kind and hardware, and added to ``manager.providers`` when the file lists
    them, so the new endpoint is routed)."""
    from broker.deploy.configfile import record_endpoint

    values: dict[str, Any] = {"app_name": result.app_name, "class_name": result.class_name, "url": result.url}
    if endpoint is not None and endpoint != "modal":
        values = {k: v for k, v in values.items() if v is not None}
    named = {} if plan is None else {"hardware": plan.hardware,
                                     **({"environment": plan.environment} if plan.environment else {})}
    return record_endpoint(path, "modal", endpoint, values, named)
