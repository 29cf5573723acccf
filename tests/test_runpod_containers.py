"""The Dockerfiles cannot be built here (no docker engine), so check what a build would trip on:
every COPY source exists in the context (and is not ignored), the CMD starts the RunPod handler,
and the handler's sample inputs are valid jobs."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from broker import wire
from broker.types import RenderRequest, SpeechRequest
from tests.conftest import ROOT

DOCKERFILES = [ROOT / "containers" / "base.Dockerfile", ROOT / "containers" / "runpod.Dockerfile"]


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def copies(dockerfile: Path) -> list[tuple[list[str], str]]:
    found = []
    for word, rest in instructions(dockerfile):
        if word == "COPY":
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            found.append((parts[:-1], parts[-1]))
    return found


def ignored(dockerfile: Path, source: str) -> bool:
    """Our .dockerignore files exclude everything (`*`) and re-include a few prefixes (`!path`)."""
    lines = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
    rules = [r.strip() for r in lines if r.strip() and not r.startswith("#")]
    assert rules[0] == "*", "the ignore file starts from nothing"
    included = [r[1:].rstrip("/") for r in rules if r.startswith("!")]
    return not any(source == inc or source.startswith(inc + "/") for inc in included)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copy_source_exists_and_is_sent(dockerfile: Path) -> None:
    found = copies(dockerfile)
    assert found
    for sources, _dest in found:
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile.name} copies {source}, which is not in the repository"
            assert not ignored(dockerfile, source), f"{source} is excluded by {dockerfile.name}.dockerignore"


def test_runpod_image_starts_the_handler() -> None:
    dockerfile = DOCKERFILES[1]
    steps = instructions(dockerfile)
    assert steps[0][0] == "ARG" and steps[1] == ("FROM", "${BASE_IMAGE}")
    cmd = json.loads(next(rest for word, rest in steps if word == "CMD"))
    assert cmd[0] == "python" and cmd[-1].endswith("handler.py")
    copied = {}
    for sources, dest in copies(dockerfile):
        for source in sources:
            copied[dest.rstrip("/") + "/" + Path(source).name if dest.endswith("/") else dest] = source
    assert copied[cmd[-1]] == "handlers/runpod/handler.py"
    handler = (ROOT / "handlers/runpod/handler.py").read_text()
    assert "runpod.serverless.start(" in handler and 'if __name__ == "__main__":' in handler
    envs = " ".join(rest for word, rest in steps if word == "ENV")
    for var in ("BROKER_ENGINES__DEFAULT", "BROKER_ENGINES__PIPER_VOICE", "BROKER_RUNPOD_MODE"):
        assert var in envs, f"{var} is not selectable by build arg"


def test_base_image_pins_torch_to_the_local_extra() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pinned = next(r for r in extras["local"] if r.startswith("torch=="))
    steps = instructions(DOCKERFILES[0])
    assert ("ARG", f"TORCH_VERSION={pinned.removeprefix('torch==')}") in steps
    assert any(word == "RUN" and 'pip install ".[local]"' in rest for word, rest in steps)
    runpod_pin = next(r for r in extras["runpod"] if r.startswith("runpod=="))
    assert runpod_pin in (ROOT / "handlers/runpod/requirements.txt").read_text().split()


@pytest.mark.parametrize(("name", "kind"), [("test_input.json", SpeechRequest),
                                            ("test_input_render.json", RenderRequest)])
def test_sample_inputs_are_valid_jobs(name: str, kind: type) -> None:
    job = json.loads((ROOT / "handlers" / "runpod" / name).read_text())
    assert isinstance(wire.decode_request(job["input"]), kind)


@pytest.mark.slow
@pytest.mark.usefixtures("piper_available")
def test_sdk_local_test_mode_runs_test_input() -> None:
    """`python handler.py` with test_input.json, as RunPod's docs say to try a handler before deploying."""
    env = {**os.environ, "BROKER_LOCAL__DEVICE": "cpu"}
    env.pop("RUNPOD_WEBHOOK_GET_JOB", None)
    proc = subprocess.run([sys.executable, "handler.py"], cwd=ROOT / "handlers" / "runpod", env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "completed successfully" in proc.stdout + proc.stderr
    assert "'ok': True" in proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["base.Dockerfile", "runpod.Dockerfile", "worker.Dockerfile"])
def test_every_image_installs_plugin_engines_by_build_arg(name: str) -> None:
    """`--build-arg EXTRA_PIP="my-engine"` puts a `broker.engines` plugin into any image; empty installs nothing."""
    steps = instructions(ROOT / "containers" / name)
    assert ("ARG", "EXTRA_PIP=") in steps
    run = next(rest for word, rest in steps if word == "RUN" and "EXTRA_PIP" in rest)
    assert 'if [ -n "${EXTRA_PIP}" ]; then pip install ${EXTRA_PIP}; fi' in run
    # the step then lists the engines the image really has, so a plugin that does not import shows in the log
    check = run.partition("&&")[2].strip()
    assert check.startswith("python -c ")
    done = subprocess.run(shlex.split(check), capture_output=True, text=True, timeout=120,
                          env={**os.environ, "BROKER_LOCAL__DEVICE": "cpu"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("engines: ")
