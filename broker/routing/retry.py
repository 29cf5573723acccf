"""What to do after each kind of failure, and the tenacity rules for trying one provider again.

- ``InvalidRequest``, and any provider's 400/422 answer (the request itself was refused): stop. No
  provider will do better, none is called again, and the refusal does not count against its breaker.
- ``RateLimited``: retry the same provider after its ``Retry-After`` (exponential backoff if it gave
  none), unless that wait is long and another provider is left, then fail over at once.
- ``ProviderUnavailable`` and transport errors (connection refused, reset, timeouts of the HTTP
  client): retry the same provider with exponential backoff and jitter, on the same terms.
- Everything else a provider does wrong (the job failed, was lost, timed out, sat in the queue,
  returned bad output, rejected our credentials): fail over to the next provider.
- ``BudgetExceeded`` at reservation: skip that provider; it was never called.
No wait ever runs past the job's deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from broker.errors import (
    AuthenticationFailed,
    BrokerError,
    BudgetExceeded,
    InvalidRequest,
    JobFailed,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
)


class Action(str, Enum):
    ABORT = "abort"
    RETRY = "retry"
    FAILOVER = "failover"
    SKIP = "skip"


#: HTTP statuses that refuse the request itself, not the provider's state (413 is per-provider: too big
#: for this one, so another may take it, but it says nothing about its health either)
REQUEST_REJECTED = frozenset({400, 422})
_NOT_ABOUT_HEALTH = REQUEST_REJECTED | {413}


def is_request_rejection(exc: BaseException) -> bool:
    """Was the request refused as such (so no provider can do better)?"""
    if isinstance(exc, InvalidRequest):
        return True
    return (isinstance(exc, ProviderError) and not isinstance(exc, AuthenticationFailed | RateLimited)
            and exc.status_code in REQUEST_REJECTED)


def classify(exc: BaseException) -> Action:
    if is_request_rejection(exc):
        return Action.ABORT
    if isinstance(exc, BudgetExceeded):
        return Action.SKIP
    if isinstance(exc, RateLimited | ProviderUnavailable) and exc.retryable:
        return Action.RETRY
    return Action.FAILOVER


def counts_against_provider(exc: BaseException) -> bool:
    """Does this failure say something about the provider's health (vs. the request or our budget)?"""
    if isinstance(exc, InvalidRequest | BudgetExceeded):
        return False
    return not (isinstance(exc, ProviderError) and exc.status_code in _NOT_ABOUT_HEALTH
                and not isinstance(exc, AuthenticationFailed | RateLimited))


def _is_transport_error(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionError | TimeoutError | OSError):
        return True
    # httpx/httpcore/aiohttp errors without importing them (import broker stays light)
    module = type(exc).__module__.split(".")[0]
    return module in ("httpx", "httpcore", "aiohttp") and "Error" in type(exc).__name__


def as_broker_error(exc: BaseException, provider: str) -> BrokerError:
    """Map whatever an adapter raised onto the error tree: transport trouble is ``ProviderUnavailable``."""
    if isinstance(exc, BrokerError):
        if isinstance(exc, ProviderError) and exc.provider is None:
            exc.provider = provider
        return exc
    if _is_transport_error(exc):
        return ProviderUnavailable(f"{type(exc).__name__}: {exc}", provider=provider)
    # A bug in an adapter is that provider's failure; another provider may well succeed.
    return JobFailed(f"{type(exc).__name__} in the {provider} adapter: {exc}", provider=provider)


@dataclass(frozen=True)
class RetryRules:
    #: tries at one provider before failing over (the first included)
    attempts_per_provider: int = 3
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0
    backoff_jitter_s: float = 0.5
    #: when another provider is left, waits longer than this fail over instead
    failover_after_s: float = 2.0


class wait_retry_after(wait_base):
    """Honour the provider's Retry-After; otherwise fall back to ``fallback`` (backoff with jitter)."""

    def __init__(self, fallback: wait_base) -> None:
        self.fallback = fallback

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        after = getattr(exc, "retry_after", None)
        if after is not None and after >= 0:
            return float(after)
        return float(self.fallback(retry_state))


class stop_when(stop_base):
    """Stop when ``predicate(upcoming_sleep)`` says so."""

    def __init__(self, predicate: Callable[[float], bool]) -> None:
        self.predicate = predicate

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.predicate(retry_state.upcoming_sleep)


def same_provider_retrying(
    rules: RetryRules,
    *,
    deadline: float,
    alternatives_left: Callable[[], bool],
    give_up: Callable[[], bool] = lambda: False,
    sleep: Callable[[float], Any] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncRetrying:
    """Tenacity rules for trying one provider again: by error class, within the deadline."""

    def too_long(upcoming: float) -> bool:
        if clock() + upcoming >= deadline:
            return True
        return upcoming > rules.failover_after_s and alternatives_left()

    return AsyncRetrying(
        retry=retry_if_exception(lambda e: classify(e) is Action.RETRY),
        stop=stop_after_attempt(rules.attempts_per_provider) | stop_when(too_long) | stop_when(lambda _: give_up()),
        wait=wait_retry_after(wait_exponential(multiplier=rules.backoff_initial_s, max=rules.backoff_max_s)
                              + wait_random(0, rules.backoff_jitter_s)),
        sleep=sleep,
        reraise=True,
    )
