"""One circuit breaker's line to the fleet (``HealthBoard`` with a ``SharedHealth``).

The breaker tells it when it opens or closes and asks it for the half-open trial; a 429's cooldown goes
the same way. A store that is away never stops routing: the failure is logged, and the breaker goes on
as this process alone sees it (a trial it cannot ask for is taken).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from broker.store.base import HealthEvent

if TYPE_CHECKING:
    from broker.routing.health import HealthBoard

log = logging.getLogger("broker.health")


class FleetLink:
    """Publishes one endpoint's breaker changes and asks for its trial, on the board's shared store."""

    def __init__(self, board: HealthBoard, name: str) -> None:
        self.board, self.name = board, name

    def _send(self, kind: str, until: float | None = None, ejections: int = 0) -> None:
        shared = self.board.shared
        assert shared is not None
        try:
            shared.publish(HealthEvent(kind, self.name, None if until is None else self.board._wall(until), ejections))
        except Exception as exc:
            log.warning("%s: could not share health (%s): %s", self.name, kind, exc)

    def opened(self, open_until: float, ejections: int) -> None:
        self._send("opened", open_until, ejections)

    def closed(self) -> None:
        self._send("closed")

    def cooldown(self, until: float) -> None:
        self._send("cooldown", until)

    def grant_trial(self) -> bool:
        assert self.board.shared is not None
        try:
            return self.board.shared.grant_trial(self.name, self.board.trial_lease_s)
        except Exception as exc:
            log.warning("%s: could not ask the fleet for the trial (%s); taking it", self.name, exc)
            return True

    def release_trial(self) -> None:
        assert self.board.shared is not None
        try:
            self.board.shared.release_trial(self.name)
        except Exception as exc:
            log.warning("%s: could not release the fleet's trial: %s", self.name, exc)
