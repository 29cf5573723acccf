"""Ranking policies: small values that order (and may drop) the providers able to take a job.

A policy sees ``Candidate``s (a provider with its quote) and returns a ``Ranking``. Steps compose
with ``>>``: ``drop_over_deadline() >> cheapest`` keeps the providers expected to finish in time
and orders them by price. Any callable ``(candidates, ctx) -> candidates`` works as a policy too.

    manager = CloudGPUManager(policy=fastest)
    manager = CloudGPUManager(policy=Deadline(30))          # cheapest that finishes within 30 s
    manager = CloudGPUManager(policy=lambda cs, ctx: sorted(cs, key=lambda c: c.name))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from broker.types import Quote

if TYPE_CHECKING:
    from broker.providers.base import Provider


@dataclass
class Candidate:
    provider: Provider
    quote: Quote

    @property
    def name(self) -> str:
        return self.provider.name

    @property
    def usd(self) -> float:
        return self.quote.expected_usd

    @property
    def seconds(self) -> float:
        return self.quote.expected_seconds

    @property
    def priced(self) -> bool:
        return "unpriced" not in self.quote.breakdown


@dataclass
class RankContext:
    """What a policy may want to know about the job besides the quotes."""

    #: seconds left until the caller's deadline (None: no deadline)
    deadline_s: float | None = None
    max_usd: float | None = None


@dataclass
class Ranking:
    ordered: list[Candidate] = field(default_factory=list)
    #: (candidate, why it was dropped), shown by `broker quote`
    dropped: list[tuple[Candidate, str]] = field(default_factory=list)
    #: a step that settled the order (e.g. nobody meets the deadline: fastest first) stops the chain
    final: bool = False


@runtime_checkable
class Policy(Protocol):
    def rank(self, candidates: Sequence[Candidate], ctx: RankContext) -> Ranking: ...


class Step:
    """Base of the built-in steps; ``a >> b`` runs ``a`` then ``b`` on what ``a`` kept."""

    name = "step"

    def rank(self, candidates: Sequence[Candidate], ctx: RankContext) -> Ranking:
        raise NotImplementedError

    def __rshift__(self, other: Any) -> Chain:
        return Chain(self, as_policy(other))

    def __repr__(self) -> str:
        return self.name


class Chain(Step):
    def __init__(self, *steps: Policy) -> None:
        flat: list[Policy] = []
        for s in steps:
            flat.extend(s.steps if isinstance(s, Chain) else [s])
        self.steps: list[Policy] = flat
        self.name = " >> ".join(getattr(s, "name", type(s).__name__) for s in flat)

    def rank(self, candidates: Sequence[Candidate], ctx: RankContext) -> Ranking:
        current = list(candidates)
        dropped: list[tuple[Candidate, str]] = []
        for step in self.steps:
            r = step.rank(current, ctx)
            current = r.ordered
            dropped.extend(r.dropped)
            if r.final:
                return Ranking(current, dropped, final=True)
        return Ranking(current, dropped)


class SortBy(Step):
    """Order by a key; stable, so ties keep the configured provider order."""

    def __init__(self, key: Callable[[Candidate], Any], name: str) -> None:
        self.key = key
        self.name = name

    def rank(self, candidates: Sequence[Candidate], ctx: RankContext) -> Ranking:
        return Ranking(sorted(candidates, key=self.key))


class DropOverDeadline(Step):
    """Drop providers expected to miss the deadline (``seconds``, else the caller's).

    If none would make it, the fastest are kept rather than failing at once: a late answer beats none,
    and the overall deadline still cancels the job when it passes.
    """

    def __init__(self, seconds: float | None = None) -> None:
        self.seconds = seconds
        self.name = f"deadline({seconds:g}s)" if seconds is not None else "deadline"

    def rank(self, candidates: Sequence[Candidate], ctx: RankContext) -> Ranking:
        limit = self.seconds if self.seconds is not None else ctx.deadline_s
        if ctx.deadline_s is not None and limit is not None:
            limit = min(limit, ctx.deadline_s)
        if limit is None:
            return Ranking(list(candidates))
        keep = [c for c in candidates if c.seconds <= limit]
        late = [c for c in candidates if c.seconds > limit]
        if not keep:
            return Ranking(sorted(late, key=lambda c: c.seconds), final=True)
        return Ranking(keep, [(c, f"expected {c.seconds:.1f} s misses the {limit:g} s deadline") for c in late])


class DropOverBudget(Step):
    """Drop providers whose expected cost is over the per-job cap."""

    name = "budget"
    REASON = "per-job cap"

    def __init__(self, max_usd: float | None = None) -> None:
        self.max_usd = max_usd

    def rank(self, candidates: Sequence[Candidate], ctx: RankContext) -> Ranking:
        cap = self.max_usd if self.max_usd is not None else ctx.max_usd
        if cap is None:
            return Ranking(list(candidates))
        keep = [c for c in candidates if c.usd <= cap]
        return Ranking(keep, [(c, f"expected ${c.usd:.5f} is over the ${cap:g} {self.REASON}")
                              for c in candidates if c.usd > cap])


class DropUnpriced(Step):
    """Drop providers whose hardware has no price row: under a budget an unknown cost cannot be reserved."""

    name = "priced"
    REASON = ("no price row for its hardware, so no budget can hold it (add a row with prices_path, or set "
              "manager.unknown_price_usd_per_hour)")

    def rank(self, candidates: Sequence[Candidate], ctx: RankContext) -> Ranking:
        return Ranking([c for c in candidates if c.priced],
                       [(c, f"{c.quote.hardware}: {self.REASON}") for c in candidates if not c.priced])


def _usd_key(c: Candidate) -> tuple[bool, float, float]:
    # Unpriced providers (no catalog row) go after every priced one: $0 would be a guess, not a price.
    return (not c.priced, c.usd, c.seconds)


cheapest: Step = SortBy(_usd_key, "cheapest")
fastest: Step = SortBy(lambda c: (c.seconds, not c.priced, c.usd), "fastest")


def Deadline(seconds: float | None = None) -> Step:
    """The cheapest provider expected to finish within ``seconds`` (or the caller's deadline)."""
    return DropOverDeadline(seconds) >> cheapest



class _CallablePolicy(Step):
    def __init__(self, fn: Callable[..., Sequence[Candidate]]) -> None:
        self.fn = fn
        self.name = getattr(fn, "__name__", "custom")

    def rank(self, candidates: Sequence[Candidate], ctx: RankContext) -> Ranking:
        try:
            chosen = list(self.fn(candidates, ctx))
        except TypeError:
            chosen = list(self.fn(candidates))
        kept = {id(c) for c in chosen}
        return Ranking(chosen, [(c, f"dropped by policy {self.name}") for c in candidates if id(c) not in kept])


def as_policy(value: Policy | Callable[..., Sequence[Candidate]] | str | None) -> Policy:
    """A policy from a policy object, a callable, or one of the names in ``POLICIES``."""
    if value is None:
        return cheapest
    if isinstance(value, str):
        try:
            return POLICIES[value]
        except KeyError:
            from broker.errors import ConfigurationError

            raise ConfigurationError(f"unknown policy {value!r}; choose one of {', '.join(POLICIES)}") from None
    if callable(getattr(value, "rank", None)):
        return value  # type: ignore[return-value]
    if callable(value):
        return _CallablePolicy(value)
    raise TypeError(f"not a policy: {value!r}")


deadline: Step = Deadline()

#: names a settings file may use for ``manager.policy``
POLICIES: dict[str, Step] = {"cheapest": cheapest, "fastest": fastest, "deadline": deadline}
