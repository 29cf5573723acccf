"""`broker bench --live` against loopback clouds: the RunPod emulator (real SDK worker) and the Replicate
emulator (real Cog runtime) are started here, and `broker bench` runs in a subprocess pointed at them.

    PYTHONPATH=. python scripts/bench_emulated.py -- --providers runpod,replicate,local --plot docs/bench-live.png

Everything after ``--`` goes to `broker bench` (``--live`` is added). The RunPod emulator is started
first and the bench is launched without waiting for its worker, so RunPod's first calibration job
meets a worker still booting (imports + Piper load), as after a scale-from-zero. What this measures is
our plumbing and this machine's CPU, not the GPUs the price rows name: see docs/BENCH.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.testing.cog_runtime import CogRuntime  # noqa: E402
from broker.testing.replicate_emulator import EmulatorServer, ReplicateEmulator  # noqa: E402
from broker.testing.runpod_emulator import RunPodEmulator  # noqa: E402

TOKEN = "r8_emulated_bench_token"


def main(argv: list[str]) -> int:
    args = argv[argv.index("--") + 1:] if "--" in argv else argv
    local_env = {"BROKER_LOCAL__DEVICE": os.environ.get("BROKER_LOCAL__DEVICE", "cpu")}
    with tempfile.TemporaryDirectory(prefix="bench-emulated-") as tmp:
        runtime = CogRuntime(env=local_env).start()
        try:
            with EmulatorServer(ReplicateEmulator(runtime.url, token=TOKEN)) as replicate:
                runpod = RunPodEmulator(worker_env=local_env, long_poll_s=5).start()
                try:
                    env = {
                        **os.environ, **runpod.env(), **local_env,
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                        "BROKER_CONFIG": os.environ.get("BROKER_CONFIG", str(ROOT / "tests" / "data" / "empty.toml")),
                        "BROKER_LEDGER__PATH": str(Path(tmp) / "ledger.sqlite"),
                        "REPLICATE_API_TOKEN": TOKEN,
                        "BROKER_REPLICATE__MODEL": "broker/broker",
                        "BROKER_REPLICATE__BASE_URL": f"{replicate.url}/v1",
                        "BROKER_RUNPOD__QUEUE_TIMEOUT_S": "300",
                    }
                    cmd = [sys.executable, "-m", "broker", "bench", "--live", *args]
                    return subprocess.run(cmd, env=env, cwd=ROOT).returncode
                finally:
                    runpod.stop()
        finally:
            runtime.stop()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
