"""Helpers for the money-trail tests: a scripted RunPod worker and a manager over the emulator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from broker.money.ledger import Ledger
from broker.money.pricing import Catalog, PriceRow
from broker.providers.runpod import RunPodProvider
from broker.routing.manager import CloudGPUManager
from broker.settings import Settings
from broker.testing.runpod_emulator import RunPodEmulator
from broker.testing.runpod_scripted import ScriptedWorker


class Worker(ScriptedWorker):
    """The emulator's scripted worker, named for these tests."""

    def __init__(self, emu: RunPodEmulator, worker_id: str = "money-1") -> None:
        super().__init__(emu, worker_id)


#: a RunPod A100 row with a short cold start, so emulated cold starts match the catalog's figure
A100 = PriceRow(provider="runpod", hardware=("a100-80gb",), profile="A100", usd_per_second=0.00076,
                min_billed_s=1, increment_s=1, cold_start_s=1.0, idle_s=5.0, basis="config",
                billing_model="test: RunPod A100 with a 1 s cold start")


def runpod(emu: RunPodEmulator, **kw: Any) -> RunPodProvider:
    kw.setdefault("queue_timeout_s", 0.3)
    return RunPodProvider(emu.endpoint_id, emu.api_key, base_url=emu.base_url, **kw)


def manager(emu: RunPodEmulator, ledger_path: Path | str, *, provider: RunPodProvider | None = None,
            catalog: Catalog | None = None, **manager_settings: Any) -> CloudGPUManager:
    """A manager over one RunPod endpoint on the emulator (no local fallback), with a ledger file."""
    s = Settings()
    s.manager.fallback_local = False
    s.manager.cancel_patience_s = 0.3
    s.manager.attempts_per_provider = 1
    for key, value in manager_settings.items():
        setattr(s.manager, key, value)
    return CloudGPUManager([provider or runpod(emu)], settings=s, ledger=Ledger(ledger_path),
                           catalog=catalog or Catalog.packaged().with_prices([A100]))


def rows(path: Path | str) -> list[dict[str, Any]]:
    ledger = Ledger(path)
    try:
        return ledger.attempts()
    finally:
        ledger.close()
