"""Bring your own engine: a real installable package with a `broker.engines` entry point (built with pip
into a folder of its own, never into the shared venv) runs on the local provider, `broker worker serve`,
and the RunPod emulator's real SDK worker; `engines.plugins` in the settings names one too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import broker
from broker import engines
from broker.engines.voices import median_f0
from broker.errors import EngineUnavailable, InvalidRequest
from broker.media import SAMPLE_RATE, Audio
from broker.providers.base import Capabilities
from broker.providers.http import HTTPProvider
from broker.providers.runpod import RunPodProvider
from broker.routing.manager import CloudGPUManager
from broker.settings import EngineSettings, LocalSettings, Settings
from broker.testing.cog_runtime import free_port
from broker.testing.runpod_emulator import RunPodEmulator
from broker.types import SpeechRequest
from tests.conftest import run_cli

REPO = Path(broker.__file__).resolve().parent.parent

ENGINE_SOURCE = '''
"""A tiny broker engine: one pure tone per sentence, its pitch set by the speaker (150 Hz × (id + 1))."""
import numpy as np

from broker.engines.base import SpeechEngine, check_cancel
from broker.media import SAMPLE_RATE, Audio


class ToneEngine(SpeechEngine):
    name = "tone"

    @classmethod
    def from_settings(cls, settings, device="cpu"):
        return cls()

    def load(self):
        pass

    def speakers(self):
        return ["low", "high"]

    def stream(self, request, cancel=None):
        speaker = request.speaker if isinstance(request.speaker, int) else self.speakers().index(request.speaker)
        t = np.arange(int(0.4 * SAMPLE_RATE)) / SAMPLE_RATE
        tone = (0.5 * np.sin(2 * np.pi * 150.0 * (speaker + 1) * t)).astype(np.float32)
        for sentence in request.text.split(". "):
            check_cancel(cancel)
            yield Audio(tone, SAMPLE_RATE, text=sentence)
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "broker-tone-engine"
version = "0.1.0"
dependencies = []

[project.entry-points."broker.engines"]
tone = "tone_engine:ToneEngine"

[tool.setuptools]
py-modules = ["tone_engine"]
'''


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip install --target` of the package: a real dist-info with the entry point, on no one's path yet."""
    src = tmp_path_factory.mktemp("tone-src")
    (src / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    (src / "tone_engine.py").write_text(textwrap.dedent(ENGINE_SOURCE))
    site = tmp_path_factory.mktemp("tone-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(src)], check=True, timeout=120)
    assert (site / "tone_engine.py").is_file() and list(site.glob("broker_tone_engine-*.dist-info"))
    return site


@pytest.fixture
def plugin_env(plugin_site: Path, tmp_path: Path) -> dict[str, str]:
    """A user's environment with the plugin installed, and nothing of the developer's config or ledger."""
    return {
        "PYTHONPATH": os.pathsep.join([str(plugin_site), str(REPO)]),
        "BROKER_CONFIG": str(Path(__file__).parent / "data" / "empty.toml"),  # exists, and says nothing
        "BROKER_LEDGER__PATH": str(tmp_path / "ledger.sqlite"),
        "BROKER_LOCAL__DEVICE": "cpu",
        "BROKER_MANAGER__PROVIDERS": '["local"]',
    }


def _is_tone(audio: Audio, hz: float) -> None:
    assert audio.sample_rate == SAMPLE_RATE and audio.duration_s > 0.3
    assert median_f0(audio.samples, SAMPLE_RATE) == pytest.approx(hz, rel=0.03)


def test_a_configured_plugin_that_cannot_import_is_unavailable_with_the_reason() -> None:
    try:
        engines.configure(EngineSettings(plugins={"mine": "no_such_package.engine:Mine"}), device="cpu")
        assert "mine" not in engines.available()
        assert "mine" not in Capabilities.broker_worker("cpu").engines
        with pytest.raises(EngineUnavailable, match=r"no_such_package.*install its package"):
            engines.check(SpeechRequest(text="Hi.", engine="mine"))
        with pytest.raises(InvalidRequest, match=r"unknown engine 'other'.*mine"):
            engines.check(SpeechRequest(text="Hi.", engine="other"))
        engines.configure(EngineSettings(plugins={"numpy": "numpy:ndarray"}), device="cpu")
        with pytest.raises(EngineUnavailable, match=r"not a broker\.engines\.base\.SpeechEngine"):
            engines.speech_engine("numpy")
    finally:
        engines.configure()


def test_installed_and_configured_plugins_are_what_a_worker_offers(plugin_env: dict[str, str]) -> None:
    code = ("from broker import engines; from broker.providers.base import Capabilities; "
            "import json; print(json.dumps([engines.available(), sorted(Capabilities.broker_worker('cpu').engines)]))")
    env = {**os.environ, **plugin_env, "BROKER_ENGINES__PLUGINS": '{"tone2": "tone_engine:ToneEngine"}'}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    available, offered = json.loads(done.stdout)
    assert {"tone", "tone2"} <= set(available) and "csm" not in available  # no CSM weights here
    assert set(offered) == set(available)


@pytest.mark.usefixtures("piper_available")
def test_local_provider_runs_the_plugin_from_the_cli(plugin_env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "tone.wav"
    env = {**plugin_env, "BROKER_ENGINES__PLUGINS": '{"tone2": "tone_engine:ToneEngine"}'}
    done = run_cli("speak", "One. Two.", "--engine", "tone2", "--speaker", "1", "-o", str(out), env=env)
    assert done.returncode == 0, done.stderr
    _is_tone(Audio.from_file(out), 300.0)


@pytest.fixture
def plugin_worker(plugin_env: dict[str, str]) -> Iterator[str]:
    """`broker worker serve` with the plugin installed, preloading it as its default engine."""
    port = free_port()
    env = {**os.environ, **plugin_env, "BROKER_ENGINES__DEFAULT": "tone"}
    proc = subprocess.Popen([sys.executable, "-m", "broker", "worker", "serve", "--port", str(port),
                             "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)  # polling a subprocess that is starting: nothing to wait on but its port
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def test_worker_serves_the_plugin(plugin_worker: str) -> None:
    ready = httpx.get(f"{plugin_worker}/ready", timeout=5).json()
    assert "tone" in ready["engines"]
    async with HTTPProvider(plugin_worker) as worker:
        audio = await worker.arun(SpeechRequest(text="Served. By the worker.", engine="tone", speaker=1))
        _is_tone(audio, 300.0)
        chunks = [c async for c in worker.astream_speech("First. Second.", engine="tone")]
        assert [c.text for c in chunks] == ["First", "Second.", ""] and chunks[-1].is_end  # then the end marker


@pytest.mark.slow
async def test_runpod_sdk_worker_serves_the_plugin_through_the_manager(plugin_env: dict[str, str]) -> None:
    worker_env = {**plugin_env, "BROKER_ENGINES__DEFAULT": "tone", "BROKER_PRELOAD_RENDER": "0"}
    emu = RunPodEmulator(worker_env=worker_env, long_poll_s=5)
    emu.start()
    try:
        emu.wait_for_worker(timeout=180)
        # the endpoint's image carries the plugin: its configuration says so (runpod.engines)
        rp = RunPodProvider(emu.endpoint_id, emu.api_key, base_url=emu.base_url, engines=["piper", "tone"],
                            queue_timeout_s=120.0)
        manager = CloudGPUManager([rp], settings=Settings(local=LocalSettings(enabled=False)))
        audio = await manager.agenerate_speech("Through RunPod. With a plugin.", speaker=0, engine="tone",
                                               return_tensor=False)
        _is_tone(audio, 150.0)
        assert audio.report is not None and audio.report.provider == "runpod"
        chunks = [c async for c in rp.astream_speech("Streamed. Too.", engine="tone")]
        assert [c.text for c in chunks] == ["Streamed", "Too.", ""] and chunks[-1].is_end
        await manager.aclose()
    finally:
        emu.stop()


def test_modal_and_replicate_images_take_extra_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    """`BROKER_EXTRA_PIP` at deploy time is to Modal's and Replicate's images what EXTRA_PIP is to the Dockerfiles."""
    from broker.deploy.replicate import image_requirements

    plain = image_requirements()
    monkeypatch.setenv("BROKER_EXTRA_PIP", "broker-tone-engine==0.1.0 'other-engine>=2'")
    assert image_requirements() == [*plain, "broker-tone-engine==0.1.0", "other-engine>=2"]
    pytest.importorskip("modal")
    from tests.modal_helpers import load_modal_app

    assert load_modal_app("broker_modal_app_extra").extra_pip() == ["broker-tone-engine==0.1.0", "other-engine>=2"]
