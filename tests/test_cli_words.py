"""Words that help: hints print as written (rich markup eats square brackets), `--json` failures are
JSON on stdout, commands say where they wrote, and the emulators' export lines keep their jobs out of
the user's own ledger."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from broker.money.ledger import Ledger
from broker.providers import registry
from broker.testing.cog_runtime import free_port
from tests.conftest import ROOT, run_cli

#: a config file with nothing in it (BROKER_CONFIG must name a file that exists)
EMPTY_CONFIG = Path(__file__).parent / "data" / "empty.toml"

#: rich wraps tables to the terminal; a wide one keeps each hint on one line
WIDE = {"COLUMNS": "400"}


def _blocking(tmp_path: Path, modules: list[str]) -> dict[str, str]:
    """An environment in which ``modules`` are not installed (a sitecustomize marks them missing)."""
    site = tmp_path / "block"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        f"for name in {modules!r}:\n"
        "    sys.modules[name] = None  # import raises ModuleNotFoundError; find_spec says None\n"
    )
    return {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}


def test_every_install_hint_prints_verbatim(tmp_path: Path) -> None:
    modules = [e.path.partition(":")[0] for e in registry.REGISTRY.values()]
    done = run_cli("providers", "--no-probe", env={**WIDE, **_blocking(tmp_path, modules)})
    assert done.returncode == 0, done.stderr
    for name, entry in registry.REGISTRY.items():
        assert entry.hint in done.stdout, f"{name}: {entry.hint!r} not printed as written:\n{done.stdout}"


def test_config_hints_print_verbatim(tmp_path: Path) -> None:
    env = {**WIDE, "RUNPOD_API_KEY": "", "BROKER_RUNPOD__ENDPOINT_ID": "", "REPLICATE_API_TOKEN": ""}
    done = run_cli("providers", "--no-probe", env=env)
    assert done.returncode == 0, done.stderr
    assert "([runpod] endpoint_id or BROKER_RUNPOD__ENDPOINT_ID" in done.stdout


@pytest.mark.parametrize(("args", "blocked", "hint"), [
    (["worker", "serve", "--port", "0"], ["uvicorn"], "pip install 'broker[worker]'"),
    (["emulate", "replicate", "--port", "0"], ["fastapi"], "pip install 'broker[worker,replicate]'"),
    (["bench", "--no-local", "--plot", "p.png"], ["matplotlib"], "pip install 'broker[plot]'"),
])
def test_error_hints_print_verbatim(tmp_path: Path, args: list[str], blocked: list[str], hint: str) -> None:
    done = run_cli(*args, cwd=tmp_path, env={**WIDE, **_blocking(tmp_path, blocked)}, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert hint in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("args", [
    ["speak", "   ", "--json"],
    ["speak", "Hello.", "-o", "x.ogg", "--json"],  # .mp3 is a supported output since long work
    ["render", "--json"],
    ["quote", "   ", "--json"],
])
def test_json_failures_are_json_on_stdout(tmp_path: Path, args: list[str]) -> None:
    done = run_cli(*args, cwd=tmp_path)
    assert done.returncode == 2
    error = json.loads(done.stdout)
    assert error["ok"] is False and error["exit_code"] == 2
    assert error["error"]["type"] == "InvalidRequest" and error["error"]["field"]
    assert error["error"]["message"] in done.stderr  # the one line for people is still there
    assert not list(tmp_path.iterdir()), "nothing is written"


@pytest.mark.usefixtures("piper_available")
def test_speak_without_output_says_where_it_wrote(tmp_path: Path) -> None:
    done = run_cli("speak", "Where did it go?", cwd=tmp_path, env=WIDE)
    assert done.returncode == 0, done.stderr
    assert f"wrote {tmp_path / 'out.wav'} (no -o given)" in done.stdout
    assert (tmp_path / "out.wav").stat().st_size > 1000


def test_bench_says_where_the_plot_went(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    done = run_cli("bench", "--no-local", "--words", "500", "--render-seconds", "none", "--json",
                   "--plot", "p.png", "--csv", "rows.csv", cwd=tmp_path, env=WIDE, timeout=240)
    assert done.returncode == 0, done.stderr
    assert f"wrote the plot to {tmp_path / 'p.png'}" in done.stderr
    assert f"wrote the rows to {tmp_path / 'rows.csv'}" in done.stderr
    assert json.loads(done.stdout)  # stdout is still only the JSON
    assert (tmp_path / "p.png").stat().st_size > 1000


def _exports(proc: subprocess.Popen[str], last: str) -> dict[str, str]:
    """The `export KEY=VALUE` lines an emulator prints, up to the line naming ``last``."""
    exports: dict[str, str] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip().startswith("export "):
            key, _, value = line.strip().removeprefix("export ").partition("=")
            exports[key] = value
            if key == last:
                break
    return exports


def test_emulate_runpod_exports_a_ledger_of_its_own(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "broker", "emulate", "runpod", "--port", "0", "--no-worker"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        exports = _exports(proc, "BROKER_LEDGER__PATH")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=45)
    ledger = Path(exports["BROKER_LEDGER__PATH"])
    assert ledger.parent == Path(tempfile.gettempdir()) / "broker-emulated"
    port = exports["BROKER_RUNPOD__BASE_URL"].rsplit(":", 1)[1].split("/")[0]
    assert ledger.name == f"runpod-{port}.sqlite"


@pytest.mark.slow
@pytest.mark.usefixtures("piper_available")
def test_emulate_replicate_exports_point_broker_at_it_and_keep_its_jobs_apart(tmp_path: Path) -> None:
    from tests.replicate_support import shared_runtime

    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("REPLICATE_API_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "broker", "emulate", "replicate", "--port", str(port),
                             "--cog-url", shared_runtime().url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    try:
        exports = _exports(proc, "BROKER_LEDGER__PATH")
        assert exports["BROKER_REPLICATE__BASE_URL"] == f"http://127.0.0.1:{port}/v1"
        assert exports["BROKER_REPLICATE__MODEL"] == "broker/broker"
        assert exports["REPLICATE_API_TOKEN"].startswith("r8_emulated_")
        # a user who exports exactly those lines: the job runs on the emulator and lands in its ledger
        home = tmp_path / "home"
        user = {"HOME": str(home), "BROKER_CONFIG": str(EMPTY_CONFIG), **exports}
        done = run_cli("speak", "Exported and routed.", "--provider", "replicate", "-o", str(tmp_path / "r.wav"),
                       "--json", env=user, timeout=180)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["provider"] == "replicate"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    emulated = Ledger(exports["BROKER_LEDGER__PATH"])
    try:
        assert [a["provider"] for a in emulated.attempts()] == ["replicate"]
    finally:
        emulated.close()
    assert not (home / ".local" / "share" / "broker").exists(), "nothing in the user's own ledger"
