"""The worker's ``/metrics``: Prometheus text exposition (format 0.0.4), rendered by hand.

Hand-rendered rather than through ``prometheus-client`` so the worker needs nothing beyond FastAPI,
and so each server (tests run several in one process) has its own numbers instead of one global
registry. What is exported is what an autoscaler and an operator need:

- ``broker_worker_queue_depth``: jobs running + waiting for a slot (the HPA / target-tracking metric;
  the same number ``/ready`` reports as ``running`` + ``waiting``);
- ``broker_worker_slots`` / ``broker_worker_slots_busy``: job slots (``--concurrency``) and how many run;
- ``broker_worker_jobs_waiting``, ``broker_worker_max_waiting``;
- ``broker_worker_job_seconds``: a histogram of slot-held seconds per job, by task and outcome;
- ``broker_worker_jobs_total``: jobs finished, by task and outcome (``ok`` / ``error``);
- ``broker_worker_engine_load_seconds``: how long loading the engines (and presets) took at start;
- ``broker_worker_ready``: 1 once ``/ready`` answers 200.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

#: the Content-Type Prometheus expects for the text format
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: job seconds: short speech (sub-second) up to long renders (many minutes)
JOB_SECONDS_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class _Gauges(Protocol):
    """What the server state exposes (``broker.worker.server.WorkerState``)."""

    running: int
    waiting: int

    def readiness(self) -> tuple[int, dict[str, Any]]: ...


@dataclass
class _Histogram:
    buckets: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1
        self.total += value
        self.n += 1


class WorkerMetrics:
    """Counters of one server process; ``observe_job`` is called from the server's event loop."""

    def __init__(self, buckets: Sequence[float] = JOB_SECONDS_BUCKETS) -> None:
        self._buckets = tuple(sorted(buckets))
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, str], _Histogram] = {}
        self.engine_load_seconds: float | None = None

    def observe_job(self, task: str, outcome: str, seconds: float) -> None:
        with self._lock:
            hist = self._jobs.get((task, outcome))
            if hist is None:
                hist = self._jobs[(task, outcome)] = _Histogram(self._buckets)
            hist.observe(max(0.0, seconds))

    def jobs_total(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return {key: h.n for key, h in self._jobs.items()}

    def render(self, state: _Gauges, *, slots: int, max_waiting: int) -> str:
        """The whole exposition for one scrape."""
        status, _ = state.readiness()
        lines: list[str] = []
        gauge = _family(lines, "gauge")
        gauge("broker_worker_queue_depth", "Jobs running plus jobs waiting for a slot.",
              [({}, state.running + state.waiting)])
        gauge("broker_worker_slots", "Job slots (jobs that may run at once).", [({}, slots)])
        gauge("broker_worker_slots_busy", "Job slots in use.", [({}, state.running)])
        gauge("broker_worker_jobs_waiting", "Jobs waiting for a slot.", [({}, state.waiting)])
        gauge("broker_worker_max_waiting", "Jobs allowed to wait before new ones get 503.", [({}, max_waiting)])
        gauge("broker_worker_ready", "1 once the engines are loaded and /ready answers 200.",
              [({}, 1 if status == 200 else 0)])
        if self.engine_load_seconds is not None:
            gauge("broker_worker_engine_load_seconds", "Seconds the engines (and presets) took to load at start.",
                  [({}, self.engine_load_seconds)])
        with self._lock:
            jobs = sorted(self._jobs.items())
            _family(lines, "counter")("broker_worker_jobs_total", "Jobs finished, by task and outcome.",
                                      [({"task": t, "outcome": o}, h.n) for (t, o), h in jobs])
            lines.append("# HELP broker_worker_job_seconds Seconds each job held a slot, by task and outcome.")
            lines.append("# TYPE broker_worker_job_seconds histogram")
            for (task, outcome), h in jobs:
                labels = {"task": task, "outcome": outcome}
                for upper, count in zip(h.buckets, h.counts, strict=True):
                    lines.append(_sample("broker_worker_job_seconds_bucket", {**labels, "le": _num(upper)}, count))
                lines.append(_sample("broker_worker_job_seconds_bucket", {**labels, "le": "+Inf"}, h.n))
                lines.append(_sample("broker_worker_job_seconds_sum", labels, h.total))
                lines.append(_sample("broker_worker_job_seconds_count", labels, h.n))
        return "\n".join(lines) + "\n"


def _family(lines: list[str], kind: str) -> Any:
    def add(name: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(_sample(name, labels, value) for labels, value in samples)

    return add


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _sample(name: str, labels: dict[str, str], value: float) -> str:
    if not labels:
        return f"{name} {_num(value)}"
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return f"{name}{{{inner}}} {_num(value)}"


def outcome_of(result: Any, error: BaseException | None) -> str:
    """``ok`` for a result payload that succeeded, else ``error`` (an exception, or ``{"ok": false}``)."""
    if error is not None:
        return "error"
    if isinstance(result, dict) and result.get("ok") is False:
        return "error"
    return "ok"


def task_of(payload: Any) -> str:
    """The job's task as a label: ``speech`` / ``render`` (anything else is ``other``, to bound the labels)."""
    task = payload.get("task") if isinstance(payload, dict) else None
    return task if task in ("speech", "render") else "other"


__all__ = ["CONTENT_TYPE", "JOB_SECONDS_BUCKETS", "WorkerMetrics", "outcome_of", "task_of"]
