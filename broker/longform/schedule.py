"""Slots: which endpoint the next piece goes to, and whether the budget lets it go at all.

The workers cap is handed to the cheapest endpoints first (each up to its own limit); a piece takes the
first endpoint with a free slot, so work spills onto the next endpoint only when the cheaper ones are
full. A full endpoint whose workers are all ours also takes one piece into its own queue, so a worker
that finishes starts the next piece at once instead of after a round trip through us (below its limit
an extra job would start another worker, and another cold start, so it does not). With a cap, a piece
goes only if what is spent, what is in flight and its own estimate stay under it.
"""

from __future__ import annotations

import asyncio

from broker.errors import BrokerError, BudgetStopped
from broker.longform.chunk import Piece
from broker.longform.plan import Lane

#: pieces submitted beyond a full endpoint's workers (they wait in its queue, never long: one piece's run)
QUEUE_AHEAD = 1


class Slots:
    def __init__(self, lanes: list[Lane], workers: int, max_usd: float | None) -> None:
        self.lanes, self.max_usd = lanes, max_usd
        self.allot: dict[str, int] = {}
        left = workers
        for lane in lanes:
            self.allot[lane.name] = min(lane.limit, left)
            left -= self.allot[lane.name]
        self.spent = self.in_flight_usd = 0.0
        #: set when the job must stop: nothing new is dispatched
        self.stop: BrokerError | None = None
        self._spent_done = 0.0
        self._words_done = 0
        self._reserved: dict[int, float] = {}
        self._changed = asyncio.Condition()

    def estimate(self, lane: Lane, piece: Piece) -> float:
        """What ``piece`` will cost on ``lane``: the quote, or what pieces have really cost per word if more."""
        observed = self._spent_done / self._words_done * piece.words if self._words_done else 0.0
        return max(lane.piece_usd(piece.words), observed)

    def _pick(self) -> Lane | None:
        lane = next((x for x in self.lanes if x.in_flight < self.allot[x.name]), None)
        if lane is None:
            lane = next((x for x in self.lanes if self.allot[x.name] >= x.limit
                         and x.in_flight < x.limit + QUEUE_AHEAD), None)
        return lane

    async def take(self, piece: Piece) -> Lane | None:
        """The lane for ``piece`` once one is free; None when the job is stopping (or the cap is reached)."""
        async with self._changed:
            while True:
                if self.stop is not None:
                    return None
                lane = self._pick()
                if lane is not None:
                    est = self.estimate(lane, piece)
                    if self.max_usd is not None and self.spent + self.in_flight_usd + est > self.max_usd + 1e-12:
                        if any(x.in_flight for x in self.lanes):
                            await self._changed.wait()  # what is in flight may settle below its estimate
                            continue
                        self.stop = BudgetStopped(
                            f"the job's cap of ${self.max_usd:g} is reached (${self.spent:.4f} spent this run)",
                            spent_usd=self.spent)
                        return None
                    lane.in_flight += 1
                    self.in_flight_usd += est
                    self._reserved[piece.index] = est
                    return lane
                await self._changed.wait()

    def saturated(self, other_than: Lane) -> list[str]:
        return [x.name for x in self.lanes if x.in_flight >= self.allot[x.name] and x is not other_than]

    def cap_for(self, piece: Piece) -> float | None:
        """The piece's own routed job's ``max_usd``: what is left of the cap, counting its own estimate."""
        if self.max_usd is None:
            return None
        mine = self._reserved.get(piece.index, 0.0)
        return max(mine, self.max_usd - self.spent - self.in_flight_usd + mine)

    def paid(self, cost: float, piece: Piece | None = None) -> None:
        self.spent += cost
        if piece is not None:
            self._spent_done += cost
            self._words_done += piece.words

    async def release(self, lane: Lane, piece: Piece) -> None:
        lane.in_flight -= 1
        self.in_flight_usd -= self._reserved.pop(piece.index, 0.0)
        async with self._changed:
            self._changed.notify_all()


__all__ = ["QUEUE_AHEAD", "Slots"]
