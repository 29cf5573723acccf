"""`broker deploy runpod` against the emulator's REST routes, and `broker emulate runpod` itself."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from broker.cli import app
from broker.deploy.runpod import NO_IMAGE, DeployOptions, write_endpoint_id
from broker.providers.runpod import RunPodProvider
from broker.routing.manager import CloudGPUManager
from broker.settings import Settings
from broker.testing.runpod_emulator import RunPodEmulator
from broker.types import SpeechRequest
from tests.conftest import ROOT

IMAGE = "registry.example/you/broker-runpod:0.1"


@pytest.fixture(scope="module")
def emu() -> Iterator[RunPodEmulator]:
    with RunPodEmulator(worker=False) as emulator:
        yield emulator


@pytest.fixture()
def fake_docker(tmp_path: Path) -> tuple[Path, Path]:
    """A `docker` on PATH that records its arguments; `info` fails unless DOCKER_UP is set."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "docker-calls.jsonl"
    bin_dir.mkdir()
    script = bin_dir / "docker"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        with open({str(calls)!r}, "a") as f:
            f.write(json.dumps(sys.argv[1:]) + "\\n")
        sys.exit(0 if sys.argv[1:2] != ["info"] or os.environ.get("DOCKER_UP") else 1)
        """))
    script.chmod(0o755)
    return bin_dir, calls


def deploy(emu: RunPodEmulator, config: Path, docker_bin: Path, *args: str, key: str | None = None,
           docker_up: bool = False) -> tuple[int, str]:
    env = {
        "RUNPOD_API_KEY": key or emu.api_key,
        "PATH": f"{docker_bin}{os.pathsep}{os.environ['PATH']}",
        "BROKER_CONFIG": str(config),
        "DOCKER_UP": "1" if docker_up else "",
    }
    result = CliRunner().invoke(app, ["deploy", "runpod", "--rest-url", emu.rest_url, *args], env=env)
    return result.exit_code, result.output


def test_deploy_creates_then_updates_in_place(emu: RunPodEmulator, tmp_path: Path,
                                              fake_docker: tuple[Path, Path]) -> None:
    config = tmp_path / "broker.toml"
    shutil.copy(ROOT / "config" / "broker.toml", config)
    code, output = deploy(emu, config, fake_docker[0], "--image", IMAGE, "--name", "tts-a", "--gpu", "A100-80GB",
                          "--gpu", "NVIDIA L40S", "--workers-max", "2", "--idle-timeout", "30", "--json")
    assert code == 0, output
    first = json.loads(output)
    endpoint = emu.rest.endpoints[first["endpoint_id"]]
    template = emu.rest.templates[first["template_id"]]
    assert endpoint["name"] == "tts-a" and endpoint["templateId"] == template["id"]
    assert endpoint["gpuTypeIds"] == ["NVIDIA A100 80GB PCIe", "NVIDIA A100-SXM4-80GB", "NVIDIA L40S"]
    assert (endpoint["workersMin"], endpoint["workersMax"], endpoint["idleTimeout"]) == (0, 2, 30)
    assert endpoint["flashboot"] is True and endpoint["executionTimeoutMs"] == 600_000
    assert template["name"] == "tts-a-template" and template["imageName"] == IMAGE and template["isServerless"]
    assert template["env"] == {"BROKER_ENGINES__DEFAULT": "piper", "BROKER_RUNPOD_MODE": "stream"}
    written = config.read_text()
    recorded = tomllib.loads(written)
    assert recorded["endpoints"]["tts-a"] == {"kind": "runpod", "endpoint_id": first["endpoint_id"],
                                              "hardware": "A100-80GB", "engines": ["piper"], "workers_max": 2,
                                              "compute_type": "GPU"}
    assert "endpoint_id" not in recorded["runpod"]  # --name records a named endpoint, not the [runpod] one
    assert "providers" not in recorded["manager"]  # unset: every configured endpoint is routed, tts-a too
    assert "# Example broker configuration." in written and 'hardware = "A100-80GB"' in written
    assert emu.api_key not in written
    calls = fake_docker[1].read_text().splitlines()
    assert calls == [json.dumps(["info"])]  # docker is not running: nothing built, the pushed image is used

    code, output = deploy(emu, config, fake_docker[0], "--image", IMAGE + "-2", "--name", "tts-a",
                          "--no-flashboot", "--execution-timeout", "120", "--mode", "job", "--json")
    assert code == 0, output
    second = json.loads(output)
    assert (second["endpoint_id"], second["template_id"]) == (first["endpoint_id"], first["template_id"])
    assert second["created"] == [] and len(second["updated"]) == 2
    assert sum(1 for e in emu.rest.endpoints.values() if e["name"] == "tts-a") == 1
    assert endpoint["flashboot"] is False and endpoint["executionTimeoutMs"] == 120_000
    assert template["imageName"] == IMAGE + "-2" and template["env"]["BROKER_RUNPOD_MODE"] == "job"
    assert endpoint["version"] >= 1  # a new image is a new release of the endpoint


async def test_deployed_endpoint_takes_jobs(emu: RunPodEmulator, tmp_path: Path,
                                            fake_docker: tuple[Path, Path]) -> None:
    config = tmp_path / "broker.toml"
    code, output = deploy(emu, config, fake_docker[0], "--image", IMAGE, "--name", "tts-b", "--json")
    assert code == 0, output
    endpoint_id = tomllib.loads(config.read_text())["endpoints"]["tts-b"]["endpoint_id"]
    rp = RunPodProvider(endpoint_id, emu.api_key, base_url=emu.base_url, queue_timeout_s=None)
    job = await rp.submit(SpeechRequest(text="Hi"))
    assert emu.job(job.id)["status"] == "IN_QUEUE"
    await job.cancel()


def test_dry_run_changes_nothing(emu: RunPodEmulator, tmp_path: Path, fake_docker: tuple[Path, Path]) -> None:
    config = tmp_path / "broker.toml"
    before = (dict(emu.rest.templates), dict(emu.rest.endpoints))
    code, output = deploy(emu, config, fake_docker[0], "--image", IMAGE, "--name", "tts-c", "--dry-run",
                          "--build", docker_up=True)
    assert code == 0, output
    assert "create template: tts-c-template" in output and "create endpoint: tts-c" in output
    assert "docker build" in output and "docker push" in output and "write config" in output
    assert (emu.rest.templates, emu.rest.endpoints) == before
    assert not config.exists()
    assert not fake_docker[1].exists(), "a dry run runs no docker command"


def test_build_and_push_when_docker_runs(emu: RunPodEmulator, tmp_path: Path,
                                         fake_docker: tuple[Path, Path]) -> None:
    code, output = deploy(emu, tmp_path / "broker.toml", fake_docker[0], "--image", IMAGE, "--name", "tts-d",
                          "--voice", "/runpod-volume/voices/amy.onnx", "--json", docker_up=True)
    assert code == 0, output
    calls = [json.loads(line) for line in fake_docker[1].read_text().splitlines()]
    assert calls[0] == ["info"]
    base, worker, push = calls[1:]
    assert base[:2] == ["build", "--platform"] and "containers/base.Dockerfile" in base
    assert "containers/runpod.Dockerfile" in worker and worker[-3:] == ["-t", IMAGE, "."]
    assert "BROKER_VOICE=/runpod-volume/voices/amy.onnx" in worker and "BASE_IMAGE=broker-base:local" in worker
    assert push == ["push", IMAGE]
    template = next(t for t in emu.rest.templates.values() if t["name"] == "tts-d-template")
    assert template["env"]["BROKER_ENGINES__PIPER_VOICE"] == "/runpod-volume/voices/amy.onnx"


def test_clear_errors(emu: RunPodEmulator, tmp_path: Path, fake_docker: tuple[Path, Path]) -> None:
    config = tmp_path / "broker.toml"
    code, output = deploy(emu, config, fake_docker[0], "--name", "tts-e")
    assert code == 2 and "--image" in output and "Traceback" not in output
    code, output = deploy(emu, config, fake_docker[0], "--image", IMAGE, "--gpu", "NVIDIA GTX 9000")
    assert code == 1 and "unknown gpuTypeIds" in output
    code, output = deploy(emu, config, fake_docker[0], "--image", IMAGE, key="rpa_wrong_key_123")
    assert code == 1 and "rejected the API key" in output and "rpa_wrong_key_123" not in output
    assert not config.exists()


def test_config_writing_keeps_comments(tmp_path: Path) -> None:
    config = tmp_path / "nested" / "broker.toml"
    write_endpoint_id(config, "abc123")  # no file yet: created
    assert tomllib.loads(config.read_text()) == {"runpod": {"endpoint_id": "abc123"}}
    # an existing, commented config keeps its comments and other sections
    original = (ROOT / "config" / "broker.toml").read_text()
    config.write_text(original)
    write_endpoint_id(config, "xyz789")
    out = config.read_text()
    assert tomllib.loads(out)["runpod"]["endpoint_id"] == "xyz789"
    assert out.count("\n#") == original.count("\n#")
    assert tomllib.loads(out)["manager"] == tomllib.loads(original)["manager"]
    write_endpoint_id(config, "again")
    assert tomllib.loads(config.read_text())["runpod"]["endpoint_id"] == "again"


def test_named_endpoint_joins_a_listed_providers_and_keeps_comments(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text('# mine\n[manager]\nproviders = ["runpod", "local"]  # keep this\n')
    options = DeployOptions(name="rp-cpu", compute_type="CPU", engine="piper", workers_max=5)
    write_endpoint_id(config, "cpu123", "rp-cpu", options)
    text = config.read_text()
    assert "# keep this" in text and "[endpoints.rp-cpu]" in text
    data = tomllib.loads(text)
    assert data["manager"]["providers"] == ["runpod", "local", "rp-cpu"]
    assert data["endpoints"]["rp-cpu"] == {"kind": "runpod", "endpoint_id": "cpu123", "hardware": "cpu",
                                           "engines": ["piper"], "workers_max": 5, "compute_type": "CPU"}
    write_endpoint_id(config, "cpu456", "rp-cpu", options)  # again: updated in place, listed once
    data = tomllib.loads(config.read_text())
    assert data["manager"]["providers"].count("rp-cpu") == 1 and data["endpoints"]["rp-cpu"]["endpoint_id"] == "cpu456"
    # without a name the [runpod] section is the endpoint: a CPU one is recorded as priced like one
    write_endpoint_id(config, "cpu789", None, options)
    assert tomllib.loads(config.read_text())["runpod"] == {"endpoint_id": "cpu789", "hardware": "cpu",
                                                           "compute_type": "CPU"}
    assert DeployOptions(gpu_types=["NVIDIA L40S"]).hardware == "L40S"  # priced under its shorthand


def test_cpu_endpoint_dry_run_needs_no_image_and_no_key(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    result = CliRunner().invoke(app, ["deploy", "runpod", "--name", "rp-cpu", "--cpu", "--dry-run", "--json"],
                                env={"BROKER_CONFIG": str(config), "RUNPOD_API_KEY": ""})
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    template, endpoint, record = plan["steps"]
    assert template["body"]["category"] == "CPU" and template["body"]["imageName"] == NO_IMAGE
    assert endpoint["body"]["computeType"] == "CPU" and endpoint["body"]["cpuFlavorIds"] == ["cpu3c", "cpu5c"]
    assert endpoint["body"]["vcpuCount"] == 2 and "gpuTypeIds" not in endpoint["body"]
    assert "[endpoints.rp-cpu]" in record["detail"] and not config.exists()
    text = CliRunner().invoke(app, ["deploy", "runpod", "--name", "rp-cpu", "--cpu", "--dry-run"],
                              env={"BROKER_CONFIG": str(config), "RUNPOD_API_KEY": ""})
    assert text.exit_code == 0 and "CPU cpu3c/cpu5c x 2 vCPU" in text.output and "no --image given" in text.output
    bad = CliRunner().invoke(app, ["deploy", "runpod", "--name", "x", "--cpu-flavor", "cpu9z", "--dry-run"],
                             env={"BROKER_CONFIG": str(config)})
    assert bad.exit_code == 2 and "cpu3c, cpu3g, cpu5c, cpu5g" in bad.output


async def test_cpu_endpoint_deploys_to_the_emulator_and_is_routed(emu: RunPodEmulator, tmp_path: Path,
                                                                   fake_docker: tuple[Path, Path],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "broker.toml"
    code, output = deploy(emu, config, fake_docker[0], "--image", IMAGE, "--name", "rp-cpu", "--cpu",
                          "--cpu-flavor", "cpu5c", "--vcpus", "4", "--json")
    assert code == 0, output
    endpoint = emu.rest.endpoints[json.loads(output)["endpoint_id"]]
    assert (endpoint["computeType"], endpoint["cpuFlavorIds"], endpoint["vcpuCount"]) == ("CPU", ["cpu5c"], 4)
    assert emu.rest.templates[endpoint["templateId"]]["category"] == "CPU"
    recorded = tomllib.loads(config.read_text())["endpoints"]["rp-cpu"]
    assert recorded["hardware"] == "cpu-4" and recorded["compute_type"] == "CPU"
    # a CPU flavour RunPod does not sell is refused by the emulator as by RunPod
    bad = httpx.post(f"{emu.rest_url}/endpoints", headers={"Authorization": f"Bearer {emu.api_key}"},
                     json={"templateId": endpoint["templateId"], "computeType": "CPU", "cpuFlavorIds": ["cpu9z"]})
    assert bad.status_code == 400 and "cpuFlavorIds" in bad.text
    # configured means routed: the recorded endpoint is one the manager routes to, priced as a RunPod CPU
    monkeypatch.setenv("BROKER_CONFIG", str(config))
    monkeypatch.setenv("RUNPOD_API_KEY", emu.api_key)
    manager = CloudGPUManager(settings=Settings(ledger={"path": ":memory:"}))
    (rp,) = manager.providers
    assert (rp.name, rp.kind, rp.capabilities.hardware, rp.max_concurrency) == ("rp-cpu", "runpod", "cpu-4", 3)
    await manager.aclose()


def test_emulate_runpod_command(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "broker", "emulate", "runpod", "--port", "0", "--no-worker",
                             "--rate-limit", "1", "--retry-after", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        exports: dict[str, str] = {}
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip().startswith("export "):
                key, _, value = line.strip().removeprefix("export ").partition("=")
                exports[key] = value
            if "RUNPOD_AI_API_KEY" in line:
                break
        assert {"BROKER_RUNPOD__BASE_URL", "BROKER_RUNPOD__ENDPOINT_ID", "RUNPOD_API_KEY"} <= set(exports)
        url = f"{exports['BROKER_RUNPOD__BASE_URL']}/{exports['BROKER_RUNPOD__ENDPOINT_ID']}/health"
        headers = {"Authorization": f"Bearer {exports['RUNPOD_API_KEY']}"}
        limited = httpx.get(url, headers=headers)
        assert limited.status_code == 429 and limited.headers["Retry-After"] == "3"
        assert httpx.get(url, headers=headers).json()["workers"] == {"idle": 0, "running": 0, "initializing": 0}
        assert httpx.get(url, headers={"Authorization": "Bearer nope"}).status_code == 401
        # the printed exports are all the official client needs (RUNPOD_ENDPOINT_BASE_URL, RUNPOD_API_KEY)
        code = ("import json, os, runpod; e = runpod.Endpoint(os.environ['BROKER_RUNPOD__ENDPOINT_ID'], "
                "api_key=os.environ['RUNPOD_API_KEY']); print(json.dumps(e.health()))")
        client = subprocess.run([sys.executable, "-c", code], env={**env, **exports}, capture_output=True,
                                text=True, timeout=60)
        assert client.returncode == 0, client.stderr
        assert json.loads(client.stdout)["jobs"]["inQueue"] == 0
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=45)  # CI's two cores may be busy: shutdown itself is bounded to a few seconds
    assert proc.returncode == 0
