"""A fleet on one PostgreSQL: 8 processes share one daily budget exactly; health travels between processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from broker.routing.health import BreakerConfig, BreakerState, HealthBoard
from broker.store import HealthEvent, StoreURL, open_store
from broker.store.pg_health import PostgresHealth
from tests.store_support import pg_url  # noqa: F401  (fixture)

# quoted 2 s ($0.02) on the fake GPU and billed exactly that, though it runs 0.05 s: on 2 busy cores a job
# must never reach the running-cost cap its reservation sets (2-4 s), or it would be stopped as too dear
TEXT = " ".join(["ten words that take about a fifth of a second"] * 10)
JOB_USD = 0.02
HEARTBEAT_S, OWNER_TIMEOUT_S = 0.2, 1.5

_WORKER = r"""
import asyncio, json, random, sys, time
from broker.errors import BudgetExceeded
from broker.routing.manager import CloudGPUManager
from broker.settings import Settings
from broker.testing.fake import FakeProvider, fake_catalog
from broker.types import SpeechRequest

url, text = sys.argv[1], sys.argv[2]
budget, heartbeat_s, owner_timeout_s, job_usd = map(float, sys.argv[3:7])

async def main():
    s = Settings()
    s.ledger.url = url
    s.ledger.heartbeat_s, s.ledger.owner_timeout_s = heartbeat_s, owner_timeout_s
    s.ledger.shared_health = False  # this test is about money; health has its own
    s.manager.fallback_local = False
    s.manager.daily_budget_usd = budget
    fake = FakeProvider("gpu", latency_s=0.05, billed_seconds=2.0, usd_per_second=0.01, seed=None)
    m = CloudGPUManager([fake], settings=s, catalog=fake_catalog(fake))
    done = asyncio.Event()
    counts = {"ok": 0, "over": 0, "other": []}

    async def lane():
        while not done.is_set():
            try:
                await m.arun(SpeechRequest(text=text), deadline_s=10.0)
                counts["ok"] += 1
            except BudgetExceeded:
                counts["over"] += 1  # full for now: others' reservations settle (or their owners die)
                try:
                    await asyncio.wait_for(done.wait(), random.uniform(0.3, 0.8))
                except asyncio.TimeoutError:
                    pass
            except Exception as exc:
                counts["other"].append(repr(exc))
                return

    async def monitor():
        # the budget is used up when not even one more quote fits under it
        while time.time() < give_up_at and budget - m.ledger.total() >= job_usd - 1e-9:
            await asyncio.sleep(0.25)
        done.set()

    print("ready", flush=True)  # every process starts together, when the test says so
    start_at, give_up_at = map(float, (await asyncio.to_thread(sys.stdin.readline)).split())
    await asyncio.sleep(max(0.0, start_at - time.time()))
    await asyncio.gather(monitor(), *(lane() for _ in range(50)))
    m.close()
    print(json.dumps(counts))

asyncio.run(main())
"""


def _wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.mark.slow
def test_eight_processes_share_one_budget_exactly_and_dead_ones_release_theirs(pg_url: str) -> None:  # noqa: F811
    budget = 500 * JOB_USD  # 500 jobs (each reserves twice its quote while it runs): 400 lanes want more
    ledger = open_store(pg_url)  # migrate once up front: the workers all start at the same instant
    args = [str(v) for v in (budget, HEARTBEAT_S, OWNER_TIMEOUT_S, JOB_USD)]
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, pg_url, TEXT, *args], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(8)]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready", p.stderr and p.stderr.read()[-2000:]
    start_at = time.time() + 0.3
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(f"{start_at} {start_at + 20.0}\n")
        p.stdin.flush()
    victims, survivors = procs[:2], procs[2:]
    url = StoreURL.parse(pg_url)
    import psycopg

    db = psycopg.connect(url.dsn, autocommit=True)
    db.execute(f'SET search_path TO "{url.schema}"')

    def open_ids(ps: list[subprocess.Popen[str]]) -> set[int]:
        pids = [str(p.pid) for p in ps]
        return {r[0] for r in db.execute("SELECT id FROM attempts WHERE status IN ('reserved', 'running', "
                                         "'cancelling') AND split_part(owner, ':', 2) = ANY(%s)", (pids,))}

    def open_of(ps: list[subprocess.Popen[str]]) -> int:
        return len(open_ids(ps))

    try:
        # kill -9 both victims mid-run, while they hold reservations
        _wait_for(lambda: all(open_of([v]) > 0 for v in victims), 30.0, "victims reserving")
        for v in victims:
            os.kill(v.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        for v in victims:
            v.wait()
        # what a victim sent just before it died may still be in its server connection's buffer (a settle the
        # server runs after the kill): the rows it left open are those open once its connections are closed
        names = [f"broker:{v.pid}" for v in victims]
        _wait_for(lambda: db.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = ANY(%s)",
                                     (names,)).fetchone() == (0,), 10.0, "victims' connections closed")
        held_ids = open_ids(victims)
        held = len(held_ids)
        released_in = _wait_for(lambda: open_of(victims) == 0, OWNER_TIMEOUT_S + 5.0, "dead reservations released")
        outs = []
        for p in survivors:
            stdout, stderr = p.communicate(timeout=60)
            assert p.returncode == 0, stderr[-2000:]
            outs.append(json.loads(stdout.strip().splitlines()[-1]))
        finished_in = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert all(o["other"] == [] for o in outs), outs
    assert all(o["ok"] > 0 for o in outs), outs  # every survivor got a share
    settled = ledger.total()
    assert settled <= budget + 1e-9  # never over, across 8 processes
    assert ledger.spent(window_s=86400) <= budget + 1e-9
    assert settled >= 0.9 * budget, (settled, outs)  # and the budget was used, dead reservations included
    assert held > 0 and released_in <= OWNER_TIMEOUT_S + 3 * HEARTBEAT_S + 1.0, (held, released_in)
    # the victims' open rows were closed by a survivor: ``lost``, and their (in-process, dead) jobs billed nothing
    reconciled = [r for r in ledger.attempts() if r["id"] in held_ids]
    assert len(reconciled) == len(held_ids) and all(r["status"] == "lost" and r["cost_usd"] == 0
                                                    for r in reconciled), \
        [(r["id"], r["status"], r["cost_usd"], r["provider_job_id"], r["message"]) for r in reconciled]
    survivor_pids = {str(p.pid) for p in survivors}
    assert sum(o["ok"] for o in outs) == sum(r["status"] == "succeeded" and r["owner"].split(":")[1] in survivor_pids
                                             for r in ledger.attempts())  # every job they ran is in the ledger
    ledger.close()
    db.close()
    assert finished_in < 30


class _Doorbell:
    """A ``SharedHealth`` that also rings a threading.Event when an event from another process arrives."""

    def __init__(self, inner: PostgresHealth) -> None:
        self.inner = inner
        self.heard: list[tuple[float, HealthEvent]] = []
        self.rang = threading.Condition()

    def subscribe(self, deliver: Callable[[HealthEvent], None]) -> None:
        def ring(event: HealthEvent) -> None:
            deliver(event)
            with self.rang:
                self.heard.append((time.time(), event))
                self.rang.notify_all()
        self.inner.subscribe(ring)

    def wait(self, kind: str, timeout_s: float = 5.0) -> float:
        """Wall time the first ``kind`` event arrived."""
        with self.rang:
            assert self.rang.wait_for(lambda: any(e.kind == kind for _, e in self.heard), timeout_s), self.heard
            return next(t for t, e in self.heard if e.kind == kind)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


@pytest.fixture
def two_processes(pg_url: str) -> Iterator[tuple[HealthBoard, HealthBoard, _Doorbell]]:  # noqa: F811
    open_store(pg_url).close()  # migrated
    a = HealthBoard(BreakerConfig(failure_threshold=2, base_ejection_s=0.0), shared=PostgresHealth(pg_url))
    bell = _Doorbell(PostgresHealth(pg_url))
    b = HealthBoard(BreakerConfig(failure_threshold=2, base_ejection_s=0.0), shared=bell)  # type: ignore[arg-type]
    yield a, b, bell
    a.close()
    b.close()


_OPENER = r"""
import asyncio, sys, time
from broker.routing.manager import CloudGPUManager
from broker.settings import Settings
from broker.testing.fake import FakeProvider, fake_catalog
from broker.types import SpeechRequest

s = Settings()
s.ledger.url = sys.argv[1]
s.manager.fallback_local = False
s.manager.breaker_failures = 2
s.manager.attempts_per_provider = 1
flaky = FakeProvider("flaky", script=["unavailable"])
m = CloudGPUManager([flaky], settings=s, catalog=fake_catalog(flaky))
async def main():
    for _ in range(2):
        try:
            await m.arun(SpeechRequest(text="hello there"))
        except Exception:
            pass
    assert m.health_board["flaky"].breaker.state().value == "open"
    print(time.time(), flush=True)  # just after the breaker opened (and told the fleet)
asyncio.run(main())
m.close()
"""


def test_a_breaker_opened_in_one_process_is_open_in_another_within_a_second(pg_url: str) -> None:  # noqa: F811
    open_store(pg_url).close()
    bell = _Doorbell(PostgresHealth(pg_url))
    board = HealthBoard(BreakerConfig(), shared=bell)  # type: ignore[arg-type]
    try:
        assert board["flaky"].breaker.state() == BreakerState.CLOSED
        opener = subprocess.run([sys.executable, "-c", _OPENER, pg_url], capture_output=True, text=True, timeout=60)
        assert opener.returncode == 0, opener.stderr[-2000:]
        opened_at = float(opener.stdout.strip().splitlines()[-1])
        heard_at = bell.wait("opened")
        assert heard_at - opened_at <= 1.0
        h = board["flaky"]
        assert h.breaker.state() == BreakerState.OPEN and not h.usable(board.clock())
        # a process started later learns it from the table, without any notification
        late = HealthBoard(BreakerConfig(), shared=PostgresHealth(pg_url))
        assert late["flaky"].breaker.state() == BreakerState.OPEN
        late.close()
    finally:
        board.close()


def test_one_half_open_trial_at_a_time_fleet_wide(two_processes: tuple[HealthBoard, HealthBoard, _Doorbell]) -> None:
    a, b, bell = two_processes
    for _ in range(2):
        permit = a["ep"].breaker.acquire()
        assert permit is not None
        a["ep"].breaker.record_failure(permit)
    bell.wait("opened")  # ejection 0 s: half-open at once, everywhere
    assert a["ep"].breaker.state() == b["ep"].breaker.state() == BreakerState.HALF_OPEN
    trial = a["ep"].breaker.acquire()
    assert trial is not None and trial.trial
    assert b["ep"].breaker.acquire() is None  # the fleet's one trial is A's
    assert not b["ep"].usable(b.clock()) and b["ep"].next_chance(b.clock()) is not None
    a["ep"].breaker.record_success(trial)
    bell.wait("closed")
    assert b["ep"].breaker.state() == BreakerState.CLOSED
    assert b["ep"].breaker.acquire() is not None


def test_a_released_trial_goes_to_the_next_process(two_processes: tuple[HealthBoard, HealthBoard, _Doorbell]) -> None:
    a, b, bell = two_processes
    for _ in range(2):
        permit = a["ep"].breaker.acquire()
        assert permit is not None
        a["ep"].breaker.record_failure(permit)
    bell.wait("opened")
    trial = a["ep"].breaker.acquire()
    assert trial is not None and trial.trial
    a["ep"].breaker.release(trial)  # cancelled: no verdict
    b["ep"].breaker.trial_elsewhere_until = None  # B asks again now rather than in 0.25 s
    other = b["ep"].breaker.acquire()
    assert other is not None and other.trial


def test_a_429_cooldown_is_shared(two_processes: tuple[HealthBoard, HealthBoard, _Doorbell]) -> None:
    a, b, bell = two_processes
    permit = a["ep"].breaker.acquire()
    assert permit is not None
    a["ep"].observe_failure("RateLimited: 429", a.clock(), permit, counts=False, retry_after=30.0)
    bell.wait("cooldown")
    h = b["ep"]
    assert h.cooling(b.clock()) and 28.0 < (h.cooldown_until or 0) - b.clock() <= 30.0
    assert h.breaker.state() == BreakerState.CLOSED  # a rate limit is not a failure
