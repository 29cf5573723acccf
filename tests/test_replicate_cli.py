"""`broker deploy replicate` and `broker emulate replicate`, against the emulator and the real Cog runtime."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from broker.cli import app
from broker.providers import registry
from broker.settings import Settings
from broker.testing.cog_runtime import free_port
from tests.replicate_support import TOKEN, emulator, shared_runtime

#: a config file with nothing in it (BROKER_CONFIG must name a file that exists)
EMPTY_CONFIG = Path(__file__).parent / "data" / "empty.toml"

pytestmark = pytest.mark.usefixtures("piper_available")

CONFIG = """# my broker config: this comment must survive a deploy
[manager]
providers = ["replicate", "local"]  # keep me

[replicate]
hardware = "gpu-t4"
"""


def _deploy(server_url: str, config: Path, *args: str) -> tuple[int, str]:
    env = {"REPLICATE_API_TOKEN": TOKEN, "BROKER_REPLICATE__BASE_URL": f"{server_url}/v1",
           "BROKER_CONFIG": str(config)}
    result = CliRunner().invoke(app, ["deploy", "replicate", *args], env=env)
    return result.exit_code, result.output


def test_deploy_creates_updates_and_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "broker.toml"
    config.write_text(CONFIG)
    with emulator() as server:
        emu = server.emulator
        code, output = _deploy(server.url, config, "--no-push", "--deployment", "speech", "--json")
        assert code == 0, output
        data = json.loads(output)
        assert data["action"] == "created" and data["deployment"] == "broker/speech"
        assert emu.deployments["broker/speech"]["hardware"] == "gpu-t4"  # from the config
        assert data["version"] == emu.models["broker/broker"]["versions"][-1]["id"]
        text = config.read_text()
        assert "# my broker config" in text and "# keep me" in text and 'deployment = "broker/speech"' in text

        code, output = _deploy(server.url, config, "--no-push", "--deployment", "speech", "--json")
        assert json.loads(output)["action"] == "unchanged"
        assert emu.deployments["broker/speech"]["number"] == 1

        before = config.read_text()
        code, output = _deploy(server.url, config, "--no-push", "--deployment", "speech", "--max-instances", "3",
                               "--dry-run")
        assert code == 0 and "would update" in output and "PATCH" in output
        assert emu.deployments["broker/speech"]["max_instances"] == 1 and config.read_text() == before

        code, output = _deploy(server.url, config, "--no-push", "--deployment", "speech", "--max-instances", "3",
                               "--hardware", "gpu-l40s")
        assert code == 0 and output.startswith("  ") and "updated" in output
        assert emu.deployments["broker/speech"]["number"] == 2
        assert emu.deployments["broker/speech"]["max_instances"] == 3

        # The recorded deployment is what the adapter now uses.
        monkeypatch.setenv("BROKER_CONFIG", str(config))
        settings = Settings(replicate={"api_token": TOKEN, "base_url": f"{server.url}/v1"})
        provider = registry.create("replicate", settings)
        assert provider.target == "deployment broker/speech"  # type: ignore[attr-defined]
        audio = provider.generate_speech("Deployed and recorded.")
        assert audio.duration_s > 0.5
        assert any(r.deployment == "broker/speech" for r in emu.predictions.values())


def test_a_named_endpoint_gets_its_own_deployment_and_table(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text(CONFIG)
    with emulator() as server:
        code, output = _deploy(server.url, config, "--no-push", "--deployment", "speech", "--json")
        assert code == 0, output
        code, output = _deploy(server.url, config, "--no-push", "--name", "rep-a100", "--hardware",
                               "gpu-a100-large", "--json")
        assert code == 0, output
        data = json.loads(output)
        assert data["deployment"] == "broker/rep-a100" and data["endpoint"] == "rep-a100"
        assert server.emulator.deployments["broker/rep-a100"]["hardware"] == "gpu-a100-large"
        assert server.emulator.deployments["broker/speech"]["hardware"] == "gpu-t4"  # the first is untouched
    written = tomllib.loads(config.read_text())
    assert written["replicate"]["deployment"] == "broker/speech"
    assert written["endpoints"]["rep-a100"] == {"kind": "replicate", "deployment": "broker/rep-a100",
                                                "hardware": "gpu-a100-large"}
    assert written["manager"]["providers"] == ["replicate", "local", "rep-a100"]
    assert "# keep me" in config.read_text()


def test_deploy_without_cog_says_what_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "broker.toml"
    stage = tmp_path / "stage"
    with emulator() as server:
        monkeypatch.setenv("PATH", str(tmp_path))  # no cog, no docker
        code, output = _deploy(server.url, config, "--model", "broker/broker", "--stage-dir", str(stage))
    assert code == 2, output
    assert f"cd {stage} && cog push r8.im/broker/broker" in " ".join(output.split())
    assert "Traceback" not in output and not config.exists()
    # The staged context is ready for that command: the model, the package, its requirements.
    assert (stage / "run.py").is_file() and (stage / ".cog" / "openapi_schema.json").is_file()
    assert (stage / "broker" / "worker" / "__init__.py").is_file()
    requirements = (stage / "requirements.txt").read_text()
    assert "piper-tts" in requirements and "httpx" in requirements


def test_deploy_needs_a_token(tmp_path: Path) -> None:
    env = {"REPLICATE_API_TOKEN": "", "BROKER_CONFIG": str(EMPTY_CONFIG)}
    result = CliRunner().invoke(app, ["deploy", "replicate", "--no-push"], env=env)
    assert result.exit_code == 2 and "REPLICATE_API_TOKEN" in result.output
    dry = CliRunner().invoke(app, ["deploy", "replicate", "--dry-run"], env=env)
    assert dry.exit_code == 0 and "cog push r8.im/<your-account>/broker" in dry.output


def test_emulate_command_serves_the_api(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "emulate", "replicate", "--port", str(port), "--token", TOKEN,
         "--cog-url", shared_runtime().url, "--rate-limit", "1", "--retry-after", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Token {TOKEN}"}
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/v1/account", headers=auth).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert httpx.get(f"{base}/v1/account").status_code == 401
        throttled = httpx.post(f"{base}/v1/models/broker/broker/predictions", headers=auth, json={"input": {}})
        assert throttled.status_code == 429 and throttled.headers["retry-after"] == "2"
        created = httpx.post(f"{base}/v1/models/broker/broker/predictions", headers={**auth, "Prefer": "wait=30"},
                             json={"input": {"text": "From the command line."}}, timeout=40)
        assert created.status_code == 201 and created.json()["status"] == "succeeded"
        assert httpx.post(f"{base}/_emulator/faults", json={"outage": True}).json()["outage"] is True
        assert httpx.get(f"{base}/v1/account", headers=auth).status_code == 503
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, output
    assert f"Replicate emulator on {base}" in output and TOKEN not in output
