"""`broker deploy modal`: the plan, the credential check before any network, and what lands in the config.

The deploy step itself is Modal's CLI; here it is given through ``run_deploy(runner=...)`` a runner
that records the command and answers like `modal deploy` does, since nothing here can reach Modal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from broker.deploy.modal import ModalDeployPlan, plan_from_settings, record, run_deploy
from broker.errors import InvalidRequest, ProviderError
from broker.settings import Settings
from tests.conftest import run_cli
from tests.modal_helpers import APP_FILE, ROOT

DEPLOY_OUTPUT = """\
✓ Created objects.
├── 🔨 Created mount /work/handlers/modal/app.py
├── 🔨 Created function BrokerWorker.*.
└── 🔨 Created web endpoint for BrokerWorker.web => https://acme--broker-brokerworker-web.modal.run
✓ App deployed in 41.2s! 🎉

View Deployment: https://modal.com/apps/acme/main/deployed/broker
"""


def _no_modal_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "BROKER_MODAL"))}
    env.update(HOME=str(tmp_path), MODAL_CONFIG_PATH=str(tmp_path / ".modal.toml"),
               MODAL_SERVER_URL="http://127.0.0.1:9")
    return env


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    proc = run_cli("deploy", "modal", "--dry-run", "--json", "--gpu", "L40S", "--min-containers", "1",
                   "--scaledown-window", "120", "--no-snapshot", "--config", str(config),
                   env={"HOME": str(tmp_path), "MODAL_CONFIG_PATH": str(tmp_path / "none.toml")})
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["hardware"] == "L40S" and plan["min_containers"] == 1 and plan["memory_snapshot"] is False
    assert plan["env"]["BROKER_MODAL__HARDWARE"] == "L40S"
    assert plan["env"]["BROKER_MODAL__SCALEDOWN_WINDOW_S"] == "120"
    assert plan["command"].endswith(f"modal deploy {APP_FILE} --name broker")
    assert plan["credentials"] is False
    assert not config.exists()


def test_without_credentials_fails_before_any_network(tmp_path: Path) -> None:
    env = _no_modal_env(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "broker", "deploy", "modal", "--config", str(tmp_path / "b.toml")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "no Modal credentials" in proc.stderr and "modal token new" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "b.toml").exists()


def test_bad_option_is_one_line_exit_2() -> None:
    proc = run_cli("deploy", "modal", "--dry-run", "--min-containers", "3", "--max-containers", "2")
    assert proc.returncode == 2 and "max_containers" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"min_containers": 3, "max_containers": 2}, "max_containers"),
        ({"scaledown_window_s": 1}, "scaledown_window"),
        ({"scaledown_window_s": 4000}, "scaledown_window"),
        ({"hardware": "A10G; rm -rf /"}, "gpu"),
        ({"app_name": "no spaces"}, "app_name"),
        ({"timeout_s": 5}, "timeout"),
    ],
)
def test_plan_rejects_what_modal_would(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        plan_from_settings(Settings(), **overrides)
    assert info.value.field == field


def test_plan_env_is_what_the_app_reads(tmp_path: Path) -> None:
    """The variables the deploy sets are the ones handlers/modal/app.py configures itself from."""
    plan = plan_from_settings(Settings(), hardware="H100:2", max_containers=8, timeout_s=1200)
    env = {**_no_modal_env(tmp_path), **plan.env()}
    code = (
        "import importlib.util, json\n"
        f"spec = importlib.util.spec_from_file_location('app', {str(APP_FILE)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(json.dumps({'cfg': m.cfg.model_dump(mode='json'), 'env': m._container_env()}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cfg"]["hardware"] == "H100:2" and out["cfg"]["max_containers"] == 8
    assert out["cfg"]["timeout_s"] == 1200
    assert out["env"]["BROKER_MODAL__HARDWARE"] == "H100:2", "the container is told the same values"


def test_deploy_records_names_and_url_keeping_comments(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text(
        "# my broker config\n[manager]\nproviders = [\"modal\", \"local\"]  # try Modal first\n\n"
        "[modal]\n# which GPU\nhardware = \"A10G\"\n"
    )
    calls: list[dict[str, Any]] = []

    def fake_modal_cli(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append({"cmd": cmd, **kw})
        return subprocess.CompletedProcess(cmd, 0, DEPLOY_OUTPUT, "")

    plan = plan_from_settings(Settings(), app_name="broker-prod", hardware="L4")
    result = run_deploy(plan, runner=fake_modal_cli)
    assert calls[0]["cmd"][1:] == ["-m", "modal", "deploy", str(APP_FILE), "--name", "broker-prod"]
    assert calls[0]["env"]["BROKER_MODAL__HARDWARE"] == "L4"
    assert result.url == "https://acme--broker-brokerworker-web.modal.run"
    record(result, config)

    text = config.read_text()
    assert "# my broker config" in text and "# try Modal first" in text and "# which GPU" in text
    data = tomllib.loads(text)
    assert data["modal"] == {"hardware": "A10G", "app_name": "broker-prod", "class_name": "BrokerWorker",
                             "url": "https://acme--broker-brokerworker-web.modal.run"}
    assert data["manager"]["providers"] == ["modal", "local"]


def test_failed_deploy_raises_with_the_tail_of_the_output() -> None:
    def failing(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "Error: GPU type 'Z100' is not supported\n")

    with pytest.raises(ProviderError) as info:
        run_deploy(plan_from_settings(Settings()), runner=failing)
    assert "Z100" in info.value.message and "exit 1" in info.value.message


def test_default_plan() -> None:
    plan = plan_from_settings(Settings())
    assert isinstance(plan, ModalDeployPlan) and plan.class_name == "BrokerWorker" and plan.app_file == APP_FILE
    assert plan.memory_snapshot is True and plan.env()["BROKER_MODAL__MEMORY_SNAPSHOT"] == "true"


def test_a_named_endpoint_is_recorded_as_its_own_table_and_routed(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # a second Modal app (another region, another GPU) beside the [modal] one, as issue 9's users run it
    config = tmp_path / "broker.toml"
    config.write_text("[manager]\nproviders = [\"modal\", \"local\"]\n\n[modal]\napp_name = \"broker\"\n")
    monkeypatch.setenv("BROKER_CONFIG", str(config))
    plan = plan_from_settings(Settings(), endpoint="modal-eu", hardware="L40S")
    assert plan.app_name == "modal-eu"  # a new endpoint's app does not replace the [modal] one's

    def fake_modal_cli(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 0, DEPLOY_OUTPUT, "")

    record(run_deploy(plan, runner=fake_modal_cli), config, "modal-eu", plan)
    data = tomllib.loads(config.read_text())
    assert data["modal"] == {"app_name": "broker"}
    assert data["endpoints"]["modal-eu"] == {
        "kind": "modal", "app_name": "modal-eu", "class_name": "BrokerWorker", "hardware": "L40S",
        "url": "https://acme--broker-brokerworker-web.modal.run"}
    assert data["manager"]["providers"] == ["modal", "local", "modal-eu"]
    # routing reads it back as a Modal endpoint of its own; a deploy again updates the same table
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-test")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-test")
    settings = Settings()
    assert plan_from_settings(settings, endpoint="modal-eu").hardware == "L40S"
    from broker.providers.endpoints import resolve

    rows = {r.name: r for r in resolve(settings).rows}
    assert rows["modal-eu"].kind == "modal" and rows["modal-eu"].routed, rows["modal-eu"]
    assert {p.name for p in resolve(settings).ranked} >= {"modal", "modal-eu"}


def test_dry_run_of_a_named_endpoint_says_where_it_records(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    proc = run_cli("deploy", "modal", "--name", "modal-eu", "--dry-run", "--json", "--config", str(config),
                   env={"HOME": str(tmp_path), "MODAL_CONFIG_PATH": str(tmp_path / "none.toml")})
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["app_name"] == "modal-eu" and plan["section"] == "[endpoints.modal-eu]"
    assert not config.exists()
