"""``/metrics`` in the Prometheus text format, rendered by hand (no client library needed).

Job counts by state and endpoint come from the shared job table, so every replica reports the fleet's
numbers for those; latency is this replica's own histogram; dollars come from the job table too.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Any

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def histogram(name: str, help_text: str, samples: Iterable[float]) -> list[str]:
    values = sorted(samples)
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    for edge in BUCKETS:
        lines.append(f'{name}_bucket{{le="{edge:g}"}} {bisect.bisect_right(values, edge)}')
    lines.append(f'{name}_bucket{{le="+Inf"}} {len(values)}')
    lines.append(f"{name}_sum {sum(values):.6f}")
    lines.append(f"{name}_count {len(values)}")
    return lines


def render(counts: list[dict[str, Any]], latencies: Iterable[float], *, running: int,
           queue_depth: int | None) -> str:
    lines = ["# HELP broker_gateway_jobs Jobs in the job table by state and endpoint.",
             "# TYPE broker_gateway_jobs gauge"]
    spent: dict[str, float] = {}
    for row in counts:
        provider = row["provider"] or "none"
        lines.append(f'broker_gateway_jobs{{state="{_label(row["state"])}",provider="{_label(provider)}"}} '
                     f'{int(row["n"])}')
        spent[provider] = spent.get(provider, 0.0) + float(row["usd"] or 0.0)
    lines += ["# HELP broker_gateway_spent_usd Dollars settled for gateway jobs, by endpoint.",
              "# TYPE broker_gateway_spent_usd counter"]
    lines += [f'broker_gateway_spent_usd{{provider="{_label(p)}"}} {usd:.8f}' for p, usd in sorted(spent.items())]
    lines += histogram("broker_gateway_job_seconds", "Seconds from claim to finish, on this replica.", latencies)
    lines += ["# HELP broker_gateway_running Jobs running on this replica.", "# TYPE broker_gateway_running gauge",
              f"broker_gateway_running {running}"]
    if queue_depth is not None:
        lines += ["# HELP broker_gateway_queue_depth Jobs waiting in this replica's in-process queue.",
                  "# TYPE broker_gateway_queue_depth gauge", f"broker_gateway_queue_depth {queue_depth}"]
    return "\n".join(lines) + "\n"
