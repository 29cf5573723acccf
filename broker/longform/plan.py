"""Lanes and schedules: how many pieces each endpoint may run at once, and what a fan-out will take.

A lane is one endpoint with a concurrency limit (``provider.max_concurrency`` from its config — RunPod
``workers_max``, Modal ``max_containers``, Replicate ``max_instances`` — else a default per kind) and
the quote for one typical piece. ``simulate`` plays a schedule forward: the cheapest lane fills first,
each new worker pays one cold start, the next lane takes what the first cannot. `broker quote --file`
prints it for 1, 4, 16 and 64 workers, and ``--deadline`` uses it to pick the fewest workers (so the
fewest extra cold starts, the least money) that meet the deadline.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from broker.providers.base import Provider
from broker.settings import Settings
from broker.types import Quote

#: jobs at once when the endpoint's config names no limit
DEFAULT_CONCURRENCY = 4


def concurrency(provider: Provider, settings: Settings) -> int:
    """Jobs ``provider`` may run at once: its own ``max_concurrency``, else its kind's config, else 4."""
    own = getattr(provider, "max_concurrency", None)
    if isinstance(own, int) and own > 0:
        return own
    kind = getattr(provider, "kind", provider.name)
    by_kind: dict[str, Any] = {
        "runpod": settings.runpod.workers_max,
        "modal": settings.modal.max_containers,
        "replicate": settings.replicate.max_instances,
        "local": settings.local.concurrency,
        "http": 1,
    }
    value = by_kind.get(kind, by_kind.get(provider.name, DEFAULT_CONCURRENCY))
    return max(1, int(value))


@dataclass
class Lane:
    name: str
    limit: int
    #: quote for one typical piece, cold start excluded (run seconds, $) and the cold start's own cost
    run_s: float
    usd: float
    cold_s: float
    cold_usd: float
    priced: bool = True
    in_flight: int = 0
    #: words in the piece the quote is for (a piece of other length scales its run time and $)
    words: int = 0

    def piece_usd(self, words: int) -> float:
        return self.usd * words / self.words if self.words else self.usd

    @property
    def free(self) -> bool:
        return self.in_flight < self.limit


def lane_from_quotes(name: str, limit: int, warm: Quote, cold: Quote, words: int = 0) -> Lane:
    """A lane from a warm quote (p_cold = 0) and a cold one (p_cold = 1) for the same piece."""
    run_s = warm.breakdown.get("run", warm.expected_seconds)
    cold_s = cold.breakdown.get("cold_start", 0.0)
    return Lane(name, limit, run_s, warm.expected_usd, cold_s, max(0.0, cold.expected_usd - warm.expected_usd),
                priced="unpriced" not in warm.breakdown, words=words)


def lanes_for(manager: Any, sample: Any, engine: str, words: int) -> list[Lane]:
    """One lane per endpoint the manager would use for ``sample`` (a piece of ``words`` words), in its order."""
    from broker.errors import AllProvidersFailed

    plan = manager.plan(sample)
    if not plan.ordered:
        why = "; ".join(f"{c.name}: {r}" for c, r in plan.dropped) or "no providers configured"
        raise AllProvidersFailed(f"no provider can take this job ({why})")
    lanes = []
    for c in plan.ordered:
        hw = c.provider.capabilities.hardware
        limit = concurrency(c.provider, manager.settings)
        if manager.catalog.price(c.provider.kind, hw) is not None:
            warm, cold = (manager.catalog.quote(c.provider.kind, hw, sample, default_engine=engine, p_cold=p)
                          for p in (0.0, 1.0))
            lanes.append(lane_from_quotes(c.name, limit, warm, cold, words))
        else:  # a provider that prices itself
            lanes.append(lane_from_quotes(c.name, limit, c.quote, c.quote, words))
    return lanes


@dataclass
class Forecast:
    workers: int
    wall_s: float
    usd: float
    first_audio_s: float
    by_lane: dict[str, int]


def simulate(pieces: int, lanes: Sequence[Lane], workers: int) -> Forecast:
    """Wall time and $ of ``pieces`` over at most ``workers`` at once, cheapest lane first.

    Each lane's workers start cold (one cold start each) and stay warm for the rest of the job, which
    is how serverless endpoints behave within their idle timeout.
    """
    if pieces <= 0 or not lanes:
        return Forecast(workers, 0.0, 0.0, 0.0, {})
    slots: list[tuple[int, int]] = []  # (lane index, worker number): the order workers are opened in
    for li, lane in enumerate(lanes):
        slots += [(li, k) for k in range(lane.limit)]
    slots = slots[:max(1, workers)][:pieces]
    # every opened worker is free after its cold start; pieces go to whichever frees first
    free_at = [(lanes[li].cold_s, li) for li, _ in slots]
    heapq.heapify(free_at)
    usd = sum(lanes[li].cold_usd for li, _ in slots)
    wall = 0.0
    first = math.inf
    by_lane: dict[str, int] = {}
    for _ in range(pieces):
        t, li = heapq.heappop(free_at)
        lane = lanes[li]
        done = t + lane.run_s
        first = min(first, done)
        wall = max(wall, done)
        usd += lane.usd
        by_lane[lane.name] = by_lane.get(lane.name, 0) + 1
        heapq.heappush(free_at, (done, li))
    return Forecast(len(slots), wall, usd, first, by_lane)


def workers_for_deadline(pieces: int, lanes: Sequence[Lane], deadline_s: float) -> tuple[int, Forecast]:
    """The fewest workers whose forecast meets ``deadline_s`` (more workers only add cold starts)."""
    capacity = max(1, min(pieces, sum(lane.limit for lane in lanes)))
    lo, hi = 1, capacity
    best = simulate(pieces, lanes, capacity)
    if best.wall_s > deadline_s:
        return capacity, best  # cannot be met: run as wide as allowed and say so
    while lo < hi:  # wall time falls as workers grow, so bisect
        mid = (lo + hi) // 2
        f = simulate(pieces, lanes, mid)
        if f.wall_s <= deadline_s:
            hi, best = mid, f
        else:
            lo = mid + 1
    return lo, simulate(pieces, lanes, lo)


__all__ = ["DEFAULT_CONCURRENCY", "Forecast", "Lane", "concurrency", "lane_from_quotes", "lanes_for", "simulate",
           "workers_for_deadline"]
