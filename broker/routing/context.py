"""What one provider's turn (``ProviderRun``) needs from the manager and from the job it serves.

Protocols rather than the concrete classes, so ``attempt`` does not import ``manager`` (which
imports ``attempt``): the manager and its job satisfy these structurally.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from broker.media import Audio, Video
from broker.money.budget import Accountant, TenantBudget
from broker.money.pricing import Catalog
from broker.providers.base import Request
from broker.routing.health import HealthBoard
from broker.routing.reconcile import Reconciler
from broker.routing.retry import RetryRules
from broker.settings import Settings
from broker.types import Attempt, JobReport

#: Called with a job's output once the provider has returned it and it has passed validation, before the
#: attempt is settled as succeeded in the ledger: a caller that persists the output here never has a job
#: that was finished and billed but whose output was lost (it need not run that job again). Whatever it
#: raises ends the job without a retry or a failover — the provider's work is done and billed.
OutputSink = Callable[[Audio | Video], Awaitable[None]]


class Router(Protocol):
    settings: Settings
    catalog: Catalog
    accountant: Accountant
    health_board: HealthBoard
    retry_rules: RetryRules
    reconciler: Reconciler


class RoutedJob(Protocol):
    id: str
    request: Request
    report: JobReport
    deadline: float
    max_usd: float | None
    tenant: TenantBudget | None
    streamed: Audio | None
    on_output: OutputSink | None

    def remaining(self) -> float: ...

    def record(self, attempt: Attempt) -> None: ...

    def alternatives_left(self, current: str) -> bool: ...
