"""The manager fails over from Replicate to the local provider when the emulator is made to fail, and comes back."""

from __future__ import annotations

import pytest

from broker.media import Audio
from broker.providers.local import LocalProvider
from broker.routing.manager import CloudGPUManager
from broker.settings import Settings
from broker.types import SpeechRequest, build
from tests.replicate_support import emulator, provider

pytestmark = pytest.mark.usefixtures("piper_available")


async def _speak(manager: CloudGPUManager, text: str) -> tuple[str | None, list[tuple[str, str, str | None]]]:
    audio = await manager.arun(build(SpeechRequest, text=text), timeout=120)
    assert isinstance(audio, Audio) and audio.rms() > 0.01
    report = manager.last_report
    assert report is not None
    return report.provider, [(a.provider, a.outcome, a.error_class) for a in report.attempts]


@pytest.mark.parametrize(
    ("fault", "error_class"),
    [
        ({"outage": True}, "ProviderUnavailable"),
        # A stuck prediction is caught by whichever queue timeout fires first: the adapter's own
        # (ProviderUnavailable) or the manager's (ProviderTimeout); both cancel it and fail over.
        ({"stuck": True}, ("ProviderUnavailable", "ProviderTimeout")),
        ({"fail_rate": 1.0}, "JobFailed"),
    ],
)
async def test_fails_over_to_local_and_recovers(fault: dict[str, object], error_class: str | tuple[str, ...]) -> None:
    with emulator() as server:
        replicate = provider(server, wait_s=0, queue_timeout_s=1.0)
        # An instance rather than "local": building "local" from settings reloads the voice each time.
        # One try per provider: the manager would otherwise retry a 5xx on Replicate (with backoff) first.
        one_try = Settings()
        one_try.manager.attempts_per_provider = 1
        manager = CloudGPUManager([replicate, LocalProvider()], settings=one_try)
        assert await _speak(manager, "Served by Replicate.") == ("replicate", [("replicate", "succeeded", None)])

        server.emulator.faults.update(**fault)
        served_by, attempts = await _speak(manager, "Replicate is failing, so local serves this.")
        assert served_by == "local"
        expected = (error_class,) if isinstance(error_class, str) else error_class
        assert len(attempts) == 2 and attempts[1] == ("local", "succeeded", None)
        assert attempts[0][:2] == ("replicate", "failed") and attempts[0][2] in expected

        server.emulator.faults = type(server.emulator.faults)()  # the provider recovers
        assert (await _speak(manager, "Back on Replicate."))[0] == "replicate"
        # Nothing was left running on Replicate: the stuck prediction was cancelled.
        assert all(r.terminal for r in server.emulator.predictions.values())
        await manager.aclose()


async def test_bad_token_fails_over_without_retrying_replicate() -> None:
    with emulator() as server:
        manager = CloudGPUManager([provider(server, api_token="r8_wrong"), "local"], settings=Settings())
        served_by, attempts = await _speak(manager, "Wrong token.")
        assert served_by == "local"
        assert attempts == [("replicate", "failed", "AuthenticationFailed"), ("local", "succeeded", None)]
        assert [c[2] for c in server.emulator.calls] == [401]
