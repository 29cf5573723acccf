"""Policies as values, and the circuit breaker / peak-EWMA that feed them."""

from __future__ import annotations

import pytest

from broker.errors import ConfigurationError
from broker.routing.health import BreakerConfig, BreakerState, CircuitBreaker, PeakEWMA, state_from_history
from broker.routing.policy import (
    Candidate,
    Deadline,
    DropOverDeadline,
    RankContext,
    as_policy,
    cheapest,
    fastest,
)
from broker.testing.fake import FakeProvider
from broker.types import Quote


def cand(name: str, usd: float, seconds: float, priced: bool = True) -> Candidate:
    breakdown = {} if priced else {"unpriced": 1.0}
    return Candidate(FakeProvider(name), Quote(provider=name, hardware="x", expected_seconds=seconds,
                                               expected_usd=usd, breakdown=breakdown))


CANDS = [cand("slow-cheap", 0.001, 60), cand("fast-dear", 0.05, 5), cand("mid", 0.01, 20)]


def names(cs: list[Candidate]) -> list[str]:
    return [c.name for c in cs]


def test_cheapest_and_fastest() -> None:
    assert names(cheapest.rank(CANDS, RankContext()).ordered) == ["slow-cheap", "mid", "fast-dear"]
    assert names(fastest.rank(CANDS, RankContext()).ordered) == ["fast-dear", "mid", "slow-cheap"]


def test_deadline_drops_the_late_and_prefers_the_cheapest_that_makes_it() -> None:
    r = Deadline(30).rank(CANDS, RankContext())
    assert names(r.ordered) == ["mid", "fast-dear"]
    assert [c.name for c, _ in r.dropped] == ["slow-cheap"] and "deadline" in r.dropped[0][1]
    # the caller's remaining time tightens it further
    assert names(Deadline(30).rank(CANDS, RankContext(deadline_s=10)).ordered) == ["fast-dear"]


def test_deadline_keeps_the_fastest_when_nobody_makes_it() -> None:
    r = Deadline(1).rank(CANDS, RankContext())
    assert names(r.ordered) == ["fast-dear", "mid", "slow-cheap"]


def test_steps_compose_and_names_and_callables_are_policies() -> None:
    chain = DropOverDeadline(30) >> fastest
    assert names(chain.rank(CANDS, RankContext()).ordered) == ["fast-dear", "mid"]
    assert as_policy("fastest") is fastest
    with pytest.raises(ConfigurationError, match="unknown policy"):
        as_policy("random")

    def only_mid(cs: list[Candidate], ctx: RankContext) -> list[Candidate]:
        return [c for c in cs if c.name == "mid"]

    r = as_policy(only_mid).rank(CANDS, RankContext())
    assert names(r.ordered) == ["mid"] and len(r.dropped) == 2


def test_unpriced_providers_go_after_priced_ones() -> None:
    cs = [cand("plugin", 0.0, 1, priced=False), cand("paid", 0.01, 10)]
    assert names(cheapest.rank(cs, RankContext()).ordered) == ["paid", "plugin"]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_breaker_opens_after_three_and_ejections_grow() -> None:
    clock = Clock()
    b = CircuitBreaker(BreakerConfig(failure_threshold=3, base_ejection_s=10, max_ejection_s=25), clock)
    for _ in range(2):
        b.record_failure(b.acquire())  # type: ignore[arg-type]
    assert b.state() == BreakerState.CLOSED
    b.record_failure(b.acquire())  # type: ignore[arg-type]
    assert b.state() == BreakerState.OPEN and b.acquire() is None
    clock.t += 10
    assert b.state() == BreakerState.HALF_OPEN
    trial = b.acquire()
    assert trial is not None and trial.trial
    assert b.acquire() is None  # one trial at a time
    b.record_failure(trial)
    assert b.state() == BreakerState.OPEN and b.open_until == pytest.approx(clock.t + 20)  # doubled
    clock.t += 20
    b.record_failure(b.acquire())  # type: ignore[arg-type]
    assert b.open_until == pytest.approx(clock.t + 25)  # capped
    clock.t += 25
    trial = b.acquire()
    assert trial is not None
    b.record_success(trial)
    assert b.state() == BreakerState.CLOSED and b.available()


def test_late_failures_of_old_jobs_do_not_reopen_a_closed_breaker() -> None:
    clock = Clock()
    b = CircuitBreaker(BreakerConfig(3, 5, 60), clock)
    old = [b.acquire() for _ in range(6)]  # six jobs in flight before anything failed
    for p in old[:3]:
        b.record_failure(p)  # type: ignore[arg-type]
    assert b.state() == BreakerState.OPEN
    clock.t += 5
    trial = b.acquire()
    b.record_success(trial)  # type: ignore[arg-type]
    for p in old[3:]:
        b.record_failure(p)  # type: ignore[arg-type]  # old news
    assert b.state() == BreakerState.CLOSED


def test_a_cancelled_trial_frees_the_slot() -> None:
    clock = Clock()
    b = CircuitBreaker(BreakerConfig(1, 5, 60), clock)
    b.record_failure(b.acquire())  # type: ignore[arg-type]
    clock.t += 5
    trial = b.acquire()
    assert b.acquire() is None
    b.release(trial)
    assert b.acquire() is not None


def test_peak_ewma_jumps_up_and_decays_down() -> None:
    e = PeakEWMA(decay_s=10)
    e.observe(1.0, now=0)
    e.observe(5.0, now=1)
    assert e.value == 5.0  # a slow sample is believed at once
    e.observe(1.0, now=2)
    assert 4.0 < e.value < 5.0  # a fast one only gradually  # type: ignore[operator]
    e.observe(1.0, now=100)
    assert e.value == pytest.approx(1.0, abs=1e-3)


def test_state_from_history_replays_the_ledger() -> None:
    rows = [{"status": "succeeded", "started_at": 0, "ended_at": 2}] + [
        {"status": "failed", "started_at": 10 + i, "ended_at": 10 + i, "error_class": "JobLost", "message": "gone"}
        for i in range(3)
    ]
    s = state_from_history(rows, BreakerConfig(3, 30, 600), now=20)
    assert s["state"] == "open" and s["last_error"] == "JobLost: gone" and s["latency_p50_s"] == 2
    assert state_from_history(rows, BreakerConfig(3, 30, 600), now=100)["state"] == "half-open"
