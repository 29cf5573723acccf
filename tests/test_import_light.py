"""`import broker` must not pull in torch or any provider SDK."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import modules_after

HEAVY = ("torch", "runpod", "modal", "replicate", "cog", "piper", "transformers", "av", "cv2", "onnxruntime")


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


def test_import_broker_loads_no_heavy_modules() -> None:
    modules, _ = modules_after("import broker, broker.types, broker.wire, broker.providers.registry, broker.settings")
    assert _heavy(modules) == [], f"import broker pulled in: {_heavy(modules)}"


def test_cli_help_loads_no_heavy_modules() -> None:
    modules, _ = modules_after("from broker.cli import app")
    assert _heavy(modules) == [], f"the CLI pulled in: {_heavy(modules)}"


def test_import_broker_alone_waits_for_a_name_before_loading_numpy_or_pydantic() -> None:
    # the snapshot is taken inside the child, between `import broker` and the first name it is asked for
    modules_after(
        "import sys, broker\n"
        "early = [m for m in ('numpy', 'pydantic') if m in sys.modules]\n"
        "from broker import Audio, SpeechRequest, SAMPLE_RATE\n"
        "assert SpeechRequest(text='Hi.').text == 'Hi.' and SAMPLE_RATE > 0 and Audio.__name__ == 'Audio'\n"
        "assert early == [], f'import broker loaded: {early}'\n"
    )


def test_routing_with_nothing_configured_imports_no_adapter() -> None:
    # an endpoint that lacks what it needs is known to be unconfigured without importing its adapter
    modules, _ = modules_after(
        "from broker.providers.endpoints import resolve\nfrom broker.settings import Settings\nresolve(Settings())",
        env={"BROKER_CONFIG": str(Path(__file__).parent / "data" / "empty.toml")},
        drop=("BROKER_", "RUNPOD_", "REPLICATE_", "MODAL_"))
    adapters = ("httpx", "broker.providers.runpod", "broker.providers.replicate", "broker.providers.modal",
                "broker.providers.http")
    imported = [m for m in adapters if m in modules]
    assert imported == [], f"routing imported: {imported}"
