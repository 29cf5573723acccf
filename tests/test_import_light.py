"""`import broker` must not pull in torch or any provider SDK."""

from __future__ import annotations

import subprocess
import sys

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
