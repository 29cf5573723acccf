"""Per-provider health: a consecutive-failure circuit breaker and peak-EWMA latency.

The breaker opens after ``failure_threshold`` failures in a row and stays open for an ejection
time that doubles with each ejection (capped). When the ejection ends one trial job is let
through (half-open): success closes the breaker, failure opens it again for longer. Latency is
tracked as a peak-EWMA (Finagle's load balancer idea): a slow sample is believed at once, a fast
one only gradually, so a provider that just stalled is not trusted again after one lucky job.

Alone, a board is this process's view. Given a ``SharedHealth`` (``broker.store``: PostgreSQL),
it tells the fleet when a circuit opens or closes and when an endpoint asks for a cooldown, applies
what the others announce, and takes the half-open trial from the fleet, so one process at a time
risks a job on an endpoint that was failing.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from broker.routing.fleet_link import FleetLink
from broker.store.base import HealthEvent, SharedHealth


class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


#: how long to wait before asking the fleet again for a trial another process holds
TRIAL_RECHECK_S = 0.25


@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int = 3
    base_ejection_s: float = 30.0
    max_ejection_s: float = 600.0

    def ejection_s(self, ejections: int) -> float:
        return min(self.max_ejection_s, self.base_ejection_s * 2 ** max(0, ejections - 1))


@dataclass(frozen=True)
class Permit:
    """Leave to send one job. Verdicts from permits of an earlier generation (taken before the breaker
    last opened) are ignored, so late failures of old jobs cannot re-open a breaker that just closed."""

    trial: bool = False
    generation: int = 0


class CircuitBreaker:
    """Closed → open (after N failures) → half-open (one trial) → closed or open again, for longer."""

    def __init__(self, config: BreakerConfig | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or BreakerConfig()
        self.clock = clock
        self.consecutive_failures = 0
        self.ejections = 0
        self.open_until: float | None = None
        self.trial_in_flight = False
        self.generation = 0
        #: the fleet (``HealthBoard`` with a ``SharedHealth``): told of openings, asked for trials
        self.link: FleetLink | None = None
        #: the fleet refused us the trial (another process runs it): do not ask again before this
        self.trial_elsewhere_until: float | None = None

    def state(self, now: float | None = None) -> BreakerState:
        if self.open_until is None:
            return BreakerState.CLOSED
        now = self.clock() if now is None else now
        return BreakerState.OPEN if now < self.open_until else BreakerState.HALF_OPEN

    def available(self, now: float | None = None) -> bool:
        """Would a job be let through now? (Does not take the half-open trial slot.)"""
        now = self.clock() if now is None else now
        state = self.state(now)
        return state == BreakerState.CLOSED or (state == BreakerState.HALF_OPEN and not self.trial_in_flight
                                                and not self._trial_elsewhere(now))

    def _trial_elsewhere(self, now: float) -> bool:
        return self.trial_elsewhere_until is not None and now < self.trial_elsewhere_until

    def acquire(self, now: float | None = None) -> Permit | None:
        """Let a job through (the half-open trial is one permit with ``trial=True``); None if refused."""
        state = self.state(now)
        if state == BreakerState.CLOSED:
            return Permit(False, self.generation)
        if state == BreakerState.HALF_OPEN and not self.trial_in_flight:
            now = self.clock() if now is None else now
            if self._trial_elsewhere(now):
                return None
            if self.link is not None and not self.link.grant_trial():
                self.trial_elsewhere_until = now + TRIAL_RECHECK_S  # another process runs the trial
                return None
            self.trial_in_flight = True
            return Permit(True, self.generation)
        return None

    def reopens_at(self) -> float | None:
        """When a trial will be allowed (monotonic seconds); None when closed."""
        return self.open_until

    def record_success(self, permit: Permit) -> None:
        if permit.generation != self.generation:
            return
        if permit.trial:
            self.trial_in_flight = False
            self.open_until = None
            self.ejections = max(0, self.ejections - 1)
            if self.link is not None:
                self.link.closed()
        if self.open_until is None:
            self.consecutive_failures = 0

    def record_failure(self, permit: Permit, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        if permit.trial:
            self.trial_in_flight = False
        if permit.generation != self.generation:
            return  # a job sent before the last ejection: old news
        if permit.trial:
            self._open(now)
            return
        if self.open_until is not None:
            return
        self.consecutive_failures += 1
        if self.consecutive_failures >= self.config.failure_threshold:
            self._open(now)

    def release(self, permit: Permit | None) -> None:
        """A job ended with no verdict on the provider (we cancelled it): free the trial slot."""
        if permit is not None and permit.trial and permit.generation == self.generation:
            self.trial_in_flight = False
            if self.link is not None:
                self.link.release_trial()

    def _open(self, now: float) -> None:
        self.ejections += 1
        self.generation += 1
        self.consecutive_failures = 0
        self.open_until = now + self.config.ejection_s(self.ejections)
        if self.link is not None:
            self.link.opened(self.open_until, self.ejections)

    def apply_opened(self, open_until: float, ejections: int) -> None:
        """Another process opened this circuit until ``open_until`` (this breaker's clock)."""
        if self.open_until is not None and self.open_until >= open_until:
            return
        self.generation += 1  # verdicts of jobs sent before now are old news, as after our own opening
        self.open_until = open_until
        self.ejections = max(self.ejections, ejections)
        self.consecutive_failures = 0
        self.trial_in_flight = False
        self.trial_elsewhere_until = None

    def apply_closed(self) -> None:
        """Another process's trial succeeded."""
        if self.open_until is not None:
            self.open_until = None
            self.ejections = max(0, self.ejections - 1)
        self.consecutive_failures = 0
        self.trial_in_flight = False
        self.trial_elsewhere_until = None


class PeakEWMA:
    """Exponentially weighted average that jumps up to any higher sample and decays down slowly."""

    def __init__(self, decay_s: float = 10.0) -> None:
        self.decay_s = decay_s
        self.value: float | None = None
        self._stamp = 0.0

    def observe(self, sample: float, now: float) -> None:
        if self.value is None or sample > self.value:
            self.value = sample
        else:
            w = math.exp(-max(0.0, now - self._stamp) / self.decay_s)
            self.value = self.value * w + sample * (1.0 - w)
        self._stamp = now


@dataclass
class ProviderHealth:
    """Everything the manager knows about one provider's recent behaviour."""

    name: str
    breaker: CircuitBreaker
    latency: PeakEWMA = field(default_factory=PeakEWMA)
    queue: PeakEWMA = field(default_factory=PeakEWMA)
    last_error: str | None = None
    last_error_at: float | None = None
    last_activity: float | None = None
    #: monotonic time before which the provider asked not to be called (429 Retry-After)
    cooldown_until: float | None = None
    successes: int = 0
    failures: int = 0
    probe_detail: str | None = None

    def usable(self, now: float) -> bool:
        return self.breaker.available(now) and not self.cooling(now)

    def cooling(self, now: float) -> bool:
        return self.cooldown_until is not None and now < self.cooldown_until

    def next_chance(self, now: float) -> float | None:
        """Earliest monotonic time this provider may take a job again (None: it may now)."""
        times = []
        if self.cooling(now):
            assert self.cooldown_until is not None
            times.append(self.cooldown_until)
        state = self.breaker.state(now)
        if state == BreakerState.OPEN and self.breaker.open_until is not None:
            times.append(self.breaker.open_until)
        elif state == BreakerState.HALF_OPEN and self.breaker.trial_in_flight:
            times.append(now + 0.05)  # someone else's trial: look again shortly
        elif state == BreakerState.HALF_OPEN and self.breaker.trial_elsewhere_until is not None \
                and now < self.breaker.trial_elsewhere_until:
            times.append(self.breaker.trial_elsewhere_until)  # another process's trial
        return max(times) if times else None

    def observe_success(self, seconds: float, queue_s: float | None, now: float, permit: Permit) -> None:
        self.breaker.record_success(permit)
        self.latency.observe(seconds, now)
        if queue_s is not None:
            self.queue.observe(queue_s, now)
        self.last_activity = now
        self.successes += 1

    def observe_failure(self, error: str, now: float, permit: Permit, *, counts: bool = True,
                        retry_after: float | None = None) -> None:
        if counts:
            self.breaker.record_failure(permit, now)
        else:
            self.breaker.release(permit)
        if retry_after is not None and retry_after > 0:
            self.cooldown_until = max(self.cooldown_until or 0.0, now + retry_after)
            if self.breaker.link is not None:
                self.breaker.link.cooldown(self.cooldown_until)
        self.last_error = error
        self.last_error_at = now
        self.failures += 1

    def snapshot(self, now: float) -> dict[str, Any]:
        reopen = self.breaker.open_until
        return {
            "provider": self.name,
            "state": self.breaker.state(now).value,
            "consecutive_failures": self.breaker.consecutive_failures,
            "ejections": self.breaker.ejections,
            "reopens_in_s": round(reopen - now, 3) if reopen is not None and reopen > now else None,
            "cooling_for_s": round(self.cooldown_until - now, 3) if self.cooling(now) and self.cooldown_until
            else None,
            "latency_s": self.latency.value,
            "queue_s": self.queue.value,
            "last_error": self.last_error,
            "successes": self.successes,
            "failures": self.failures,
        }


class HealthBoard:
    """The ``ProviderHealth`` of every provider a manager routes to (shared with a fleet when given one)."""

    def __init__(self, config: BreakerConfig | None = None, clock: Callable[[], float] = time.monotonic,
                 shared: SharedHealth | None = None, trial_lease_s: float = 120.0) -> None:
        self.config = config or BreakerConfig()
        self.clock = clock
        self.shared = shared
        self.trial_lease_s = trial_lease_s
        self._by_name: dict[str, ProviderHealth] = {}
        # Filled by the listener thread, applied by whoever reads the board next (the event loop):
        # the breakers are only ever touched from one thread.
        self._inbox: collections.deque[HealthEvent] = collections.deque()
        if shared is not None:
            shared.subscribe(self._inbox.append)

    def __getitem__(self, name: str) -> ProviderHealth:
        if self._inbox:
            self._apply_inbox()
        return self._get(name)

    def _get(self, name: str) -> ProviderHealth:
        h = self._by_name.get(name)
        if h is None:
            h = self._by_name[name] = ProviderHealth(name, CircuitBreaker(self.config, self.clock))
            if self.shared is not None:
                h.breaker.link = FleetLink(self, name)
        return h

    def items(self) -> Iterable[tuple[str, ProviderHealth]]:
        if self._inbox:
            self._apply_inbox()
        return self._by_name.items()

    def _apply_inbox(self) -> None:
        while self._inbox:
            event = self._inbox.popleft()
            h = self._get(event.endpoint)
            if event.kind == "opened" and event.until is not None:
                # an ejection already over still leaves the circuit half-open: a trial must close it
                h.breaker.apply_opened(self._local(event.until), event.ejections)
            elif event.kind == "closed":
                h.breaker.apply_closed()
            elif event.kind == "cooldown" and event.until is not None:
                h.cooldown_until = max(h.cooldown_until or 0.0, self._local(event.until))

    def _local(self, wall: float) -> float:
        """A Unix time on this board's clock (monotonic by default)."""
        return self.clock() + (wall - time.time())

    def _wall(self, local: float) -> float:
        return time.time() + (local - self.clock())

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()

    def p_cold(self, name: str, idle_s: float, now: float, warm_p_cold: float) -> float:
        """Chance the provider's worker is cold: low if we used it within its idle window."""
        last = self[name].last_activity
        return warm_p_cold if last is not None and now - last < idle_s else 1.0


def state_from_history(attempts: Iterable[Mapping[str, Any]], config: BreakerConfig | None = None,
                       now: float | None = None) -> dict[str, Any]:
    """Replay ledger rows (oldest first; ``status``, ``started_at``, ``ended_at``) through a fresh breaker.

    Used by ``broker providers`` to show circuit state across processes: the ledger is the shared memory.
    """
    cfg = config or BreakerConfig()
    clock_now = time.time() if now is None else now
    breaker = CircuitBreaker(cfg, clock=lambda: clock_now)
    last_error = None
    latencies = []
    for row in attempts:
        status = row.get("status")
        at = float(row.get("ended_at") or row.get("started_at") or clock_now)
        permit = breaker.acquire(at)
        if permit is None:
            continue  # the breaker was open then: this job would not have been sent
        if status == "succeeded":
            breaker.record_success(permit)
            if row.get("ended_at") is not None and row.get("started_at") is not None:
                latencies.append(float(row["ended_at"]) - float(row["started_at"]))
        elif status in ("failed", "lost"):
            breaker.record_failure(permit, at)
            last_error = f"{row.get('error_class') or 'error'}: {row.get('message') or ''}".strip(": ")
        else:
            breaker.release(permit)
    latencies = latencies[-20:]
    latencies.sort()
    return {
        "state": breaker.state(clock_now).value,
        "consecutive_failures": breaker.consecutive_failures,
        "last_error": last_error,
        "latency_p50_s": latencies[len(latencies) // 2] if latencies else None,
    }
