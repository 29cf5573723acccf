"""The emulated endpoint's workers: real ``runpod`` SDK worker processes, started as RunPod starts
them (the webhook variables a worker container gets) and killed the ways real ones die."""

from __future__ import annotations

import os
import signal
import site
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


def default_handler_path() -> Path:
    """``handlers/runpod/handler.py`` of the checkout this ``broker`` was imported from."""
    import broker

    return Path(broker.__file__).resolve().parent.parent / "handlers" / "runpod" / "handler.py"


@dataclass
class WorkerInfo:
    id: str
    #: None for a worker we did not start (someone runs the image against us by hand)
    proc: subprocess.Popen[bytes] | None
    spawned: float
    #: jobs are withheld until then (the cold-start fault)
    ready_at: float
    first_poll: float | None = None
    last_seen: float | None = None
    stopping: bool = False
    exit_code: int | None = None
    #: jobs handed to this worker so far (its start-up is billed to the first)
    jobs_taken: int = 0

    @property
    def alive(self) -> bool:
        if self.proc is not None:
            return self.exit_code is None
        return self.last_seen is not None and time.monotonic() - self.last_seen < 30


def worker_environment(v2_endpoint_url: str, endpoint_id: str, worker_id: str, worker_key: str, mode: str,
                       ping_interval_ms: int) -> dict[str, str]:
    """What RunPod sets in a worker container (runpod 1.12.0 reads these), plus the fitness-check skips.

    The SDK substitutes ``$ID`` (worker id in the take URL, job id in the done/stream URLs) and
    ``$RUNPOD_POD_ID``, then appends ``&job_in_progress=``/``&isStream=``: the URLs carry a query.
    """
    v2 = v2_endpoint_url
    return {
        "RUNPOD_WEBHOOK_GET_JOB": f"{v2}/job-take/$ID?gpu=emulated",
        "RUNPOD_WEBHOOK_POST_OUTPUT": f"{v2}/job-done/$RUNPOD_POD_ID/$ID?gpu=emulated",
        "RUNPOD_WEBHOOK_POST_STREAM": f"{v2}/job-stream/$RUNPOD_POD_ID/$ID?gpu=emulated",
        "RUNPOD_WEBHOOK_PING": f"{v2}/ping/$RUNPOD_POD_ID",
        "RUNPOD_PING_INTERVAL": str(ping_interval_ms),
        "RUNPOD_POD_ID": worker_id,
        "RUNPOD_ENDPOINT_ID": endpoint_id,
        "RUNPOD_AI_API_KEY": worker_key,
        # Without these the SDK checks disk, memory, CUDA and dials 8.8.8.8 before taking work.
        "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
        "RUNPOD_SKIP_GPU_CHECK": "true",
        "BROKER_RUNPOD_MODE": mode,
    }


def spawn_worker(handler_path: Path, env: dict[str, str], log_path: Path, home: Path) -> subprocess.Popen[bytes]:
    """``python handler.py`` in the SDK's deployed mode, importing the same broker as this process."""
    import broker

    env = {**os.environ, **env}
    broker_root = str(Path(broker.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([broker_root, *filter(None, [env.get("PYTHONPATH")])]))
    env["PYTHONUNBUFFERED"] = "1"
    # The SDK prefers ~/.runpod/config.toml over RUNPOD_AI_API_KEY; a RunPod worker has no such file,
    # so neither does ours (a developer's real key must never be sent to the emulator).
    home.mkdir(parents=True, exist_ok=True)
    env["HOME"] = str(home)
    env["PYTHONUSERBASE"] = site.getuserbase()
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-u", str(handler_path)], cwd=handler_path.parent, env=env,
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # its heartbeat child (a multiprocessing.Process) dies with it
        )


def kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 0.5) -> None:
    """SIGTERM the worker's group, as RunPod does on scale-down; SIGKILL it if it lingers."""
    if proc.poll() is None:
        kill_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    kill_group(proc, signal.SIGKILL)  # also any heartbeat child left behind
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


class WorkerScaler:
    """How many SDK workers to run: ``workers_max`` from the start, or from zero growing with the queue
    (one new worker, with its own cold start, for each waiting job no starting worker will take)."""

    def __init__(self, workers_max: int = 1, from_zero: bool = False) -> None:
        self.workers_max = workers_max
        self.from_zero = from_zero

    def initial(self) -> int:
        return 0 if self.from_zero else self.workers_max

    def to_start(self, workers: Iterable[WorkerInfo], waiting: int) -> int:
        if not self.from_zero or waiting == 0:
            return 0
        managed = [w for w in workers if w.proc is not None and w.alive and not w.stopping]
        starting = sum(1 for w in managed if w.first_poll is None)
        return max(0, min(self.workers_max - len(managed), waiting - starting))
