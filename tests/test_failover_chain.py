"""One manager over every provider: each failing the way it really does, the job walks the whole chain.

RunPod's emulated endpoint has no worker (jobs stay IN_QUEUE), Replicate's emulated API is in an outage
(503), Modal's control plane is unreachable, so the self-hosted worker serves; with the worker stopped
too, the local provider serves. The order is pinned with a keep-order policy so every provider is tried.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from broker.media import Audio
from broker.providers.http import HTTPProvider
from broker.providers.local import LocalProvider
from broker.providers.modal import ModalProvider
from broker.providers.replicate import ReplicateProvider
from broker.providers.runpod import RunPodProvider
from broker.routing.manager import CloudGPUManager
from broker.settings import Settings
from broker.testing.asgi_server import LoopbackServer
from broker.testing.replicate_emulator import EmulatorServer, ReplicateEmulator
from broker.testing.replicate_state import Faults as ReplicateFaults
from broker.testing.runpod_emulator import RunPodEmulator
from broker.worker.server import create_app

pytestmark = pytest.mark.usefixtures("piper_available")

TOKEN = "r8_chain_token"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def runpod_stuck() -> Iterator[RunPodEmulator]:
    with RunPodEmulator(worker=False, long_poll_s=1) as emulator:
        yield emulator


@pytest.fixture(scope="module")
def replicate_down() -> Iterator[EmulatorServer]:
    # The outage answers 503 before anything is forwarded, so no Cog runtime is needed behind it.
    emulator = ReplicateEmulator(f"http://127.0.0.1:{_closed_port()}", token=TOKEN, faults=ReplicateFaults(outage=True))
    with EmulatorServer(emulator) as server:
        yield server


def _keep_order(candidates: Any, ctx: Any) -> list[Any]:
    return list(candidates)


def _chain(runpod_emu: RunPodEmulator, replicate: EmulatorServer, worker_url: str) -> CloudGPUManager:
    settings = Settings()
    settings.manager.attempts_per_provider = 1
    providers = [
        RunPodProvider(runpod_emu.endpoint_id, runpod_emu.api_key, base_url=runpod_emu.base_url, queue_timeout_s=1.0),
        ReplicateProvider(api_token=TOKEN, model="broker/broker", base_url=f"{replicate.url}/v1"),
        ModalProvider(token_id=SecretStr("ak-chain"), token_secret=SecretStr("as-chain"), rpc_timeout_s=1.0),
        HTTPProvider(worker_url),
        LocalProvider(),
    ]
    return CloudGPUManager(providers, settings=settings, policy=_keep_order)


def test_every_provider_fails_its_own_way_and_the_chain_ends_where_it_can(
    monkeypatch: pytest.MonkeyPatch, runpod_stuck: RunPodEmulator, replicate_down: EmulatorServer
) -> None:
    monkeypatch.setenv("MODAL_SERVER_URL", f"http://127.0.0.1:{_closed_port()}")
    worker = LoopbackServer(create_app()).start()
    try:
        manager = _chain(runpod_stuck, replicate_down, worker.url)
        audio = manager.generate_speech("The self-hosted worker takes this one.", return_tensor=False)
        assert isinstance(audio, Audio) and audio.rms() > 0.01
        report = manager.last_report
        assert report is not None and report.provider == "http"
        assert [(a.provider, a.outcome) for a in report.attempts] == [
            ("runpod", "failed"), ("replicate", "failed"), ("modal", "failed"), ("http", "succeeded")]
        errors = {a.provider: a.error_class for a in report.attempts}
        assert errors["runpod"] in ("ProviderUnavailable", "ProviderTimeout")  # stuck in queue
        assert errors["replicate"] == "ProviderUnavailable"  # 503 outage
        # the stuck RunPod job was cancelled, not left queued to start (and bill) later
        statuses = [j["status"] for j in runpod_stuck._call(_jobs(runpod_stuck))]
        assert statuses and "IN_QUEUE" not in statuses
    finally:
        worker.stop()

    # The worker is gone too: the local provider serves, having been tried last.
    audio = manager.generate_speech("Now only this machine is left.", return_tensor=False)
    report = manager.last_report
    assert report is not None and report.provider == "local"
    assert [a.provider for a in report.attempts] == ["runpod", "replicate", "modal", "http", "local"]
    assert isinstance(audio, Audio) and audio.rms() > 0.01
    manager.close()


async def _jobs(emu: RunPodEmulator) -> list[dict[str, Any]]:
    return [{"status": job.status} for job in emu.book.jobs.values()]
