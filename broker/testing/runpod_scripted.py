"""A scripted worker for the RunPod emulator: takes jobs off its queue and answers them at once.

It speaks the worker queue as the ``runpod`` SDK does (the URLs and key a worker container gets), so
the hosted side sees a real worker, without starting a process or an engine: for tests and scripts
that care about the money and the lifecycle, not the audio.
"""

from __future__ import annotations

import json
import threading

import httpx
import numpy as np

from broker import wire
from broker.media import Audio
from broker.testing.runpod_emulator import RunPodEmulator


class ScriptedWorker:
    """``take`` long-polls for one job; ``finish`` answers it with half a second of tone."""

    def __init__(self, emu: RunPodEmulator, worker_id: str = "scripted-worker") -> None:
        env = emu.worker_environment(worker_id)
        self.take_url = env["RUNPOD_WEBHOOK_GET_JOB"].replace("$ID", worker_id) + "&job_in_progress=0"
        self.done_url = env["RUNPOD_WEBHOOK_POST_OUTPUT"].replace("$RUNPOD_POD_ID", worker_id)
        self.headers = {"Authorization": env["RUNPOD_AI_API_KEY"]}
        self.served: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self) -> str | None:
        """The next job's id, or None when the long-poll ended empty."""
        resp = httpx.get(self.take_url, headers=self.headers, timeout=60)
        return str(resp.json()["id"]) if resp.status_code == 200 else None

    def finish(self, job_id: str) -> None:
        t = np.arange(12_000) / 24_000
        audio = Audio((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32))
        body = {"output": wire.encode_speech_result(job_id, audio)}
        url = self.done_url.replace("$ID", job_id) + "&isStream=false"
        resp = httpx.post(url, content=json.dumps(body),
                          headers={**self.headers, "Content-Type": "application/x-www-form-urlencoded"})
        resp.raise_for_status()
        self.served.append(job_id)

    # -- in the background ----------------------------------------------------------------------
    def start(self) -> ScriptedWorker:
        """Serve every job that arrives until ``stop``."""
        self._thread = threading.Thread(target=self._serve, name="scripted-runpod-worker", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                job_id = self.take()
            except httpx.HTTPError:
                return  # the emulator stopped
            if job_id is not None and not self._stop.is_set():
                self.finish(job_id)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
