"""What one provider's turn (``ProviderRun``) needs from the manager and from the job it serves.

Protocols rather than the concrete classes, so ``attempt`` does not import ``manager`` (which
imports ``attempt``): the manager and its job satisfy these structurally.
"""

from __future__ import annotations

from typing import Protocol

from broker.media import Audio
from broker.money.budget import Accountant, TenantBudget
from broker.money.pricing import Catalog
from broker.providers.base import Request
from broker.routing.health import HealthBoard
from broker.routing.reconcile import Reconciler
from broker.routing.retry import RetryRules
from broker.settings import Settings
from broker.types import Attempt, JobReport


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

    def remaining(self) -> float: ...

    def record(self, attempt: Attempt) -> None: ...

    def alternatives_left(self, current: str) -> bool: ...
