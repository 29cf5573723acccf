"""`import broker` must not pull in torch or any provider SDK."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "runpod", "modal", "replicate", "cog", "piper", "transformers", "av", "cv2", "onnxruntime")


def test_import_broker_loads_no_heavy_modules() -> None:
    code = (
        "import sys, broker, broker.types, broker.wire, broker.providers.registry, broker.settings\n"
        f"heavy = [m for m in sys.modules if m.split('.')[0] in {HEAVY!r}]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import broker pulled in: {out.stdout}"


def test_cli_help_loads_no_heavy_modules() -> None:
    code = (
        "import sys\n"
        "from broker.cli import app\n"
        f"heavy = [m for m in sys.modules if m.split('.')[0] in {HEAVY!r}]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the CLI pulled in: {out.stdout}"


def test_import_broker_alone_waits_for_a_name_before_loading_numpy_or_pydantic() -> None:
    code = (
        "import sys, broker\n"
        "early = [m for m in ('numpy', 'pydantic') if m in sys.modules]\n"
        "from broker import Audio, SpeechRequest, SAMPLE_RATE\n"
        "assert SpeechRequest(text='Hi.').text == 'Hi.' and SAMPLE_RATE > 0 and Audio.__name__ == 'Audio'\n"
        "print(','.join(early))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import broker loaded: {out.stdout}"


def test_routing_with_nothing_configured_imports_no_adapter() -> None:
    # an endpoint that lacks what it needs is known to be unconfigured without importing its adapter
    code = (
        "import sys, os\n"
        "from broker.providers.endpoints import resolve\n"
        "from broker.settings import Settings\n"
        "resolve(Settings())\n"
        "print(','.join(m for m in ('httpx', 'broker.providers.runpod', 'broker.providers.replicate', "
        "'broker.providers.modal', 'broker.providers.http') if m in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "RUNPOD_", "REPLICATE_", "MODAL_"))}
    env["BROKER_CONFIG"] = str(Path(__file__).parent / "data" / "empty.toml")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "", f"routing imported: {out.stdout}"
