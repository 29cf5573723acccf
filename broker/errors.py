"""The error tree.

Every failure a caller can see is a ``BrokerError``. The tree separates what the
caller did wrong (``InvalidRequest``: never retried, never sent to a provider)
from what a provider did wrong (``ProviderError``: the manager may retry or fail
over, guided by ``retryable`` and ``retry_after``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from broker.redact import scrub

if TYPE_CHECKING:
    from broker.types import Attempt


class BrokerError(Exception):
    """Base of every error broker raises on purpose."""

    #: stable name carried on the wire, so a handler's error is re-raised as the same class
    code: str = "broker_error"

    def __init__(self, message: str) -> None:
        # The one choke point for credentials: messages are often built from an upstream's body,
        # which may echo our request headers back (see broker.redact).
        message = scrub(str(message))
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "code": self.code, "message": self.message}


class InvalidRequest(BrokerError, ValueError):
    """The request itself is wrong; no provider will do better. Names the offending field."""

    code = "invalid_request"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = scrub(message)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "field": self.field}


class EngineUnavailable(BrokerError):
    """An engine cannot run here: missing weights, missing optional dependency, no device."""

    code = "engine_unavailable"


class ConfigurationError(BrokerError):
    """Settings are missing or contradictory (no endpoint id, no credentials, ...)."""

    code = "configuration_error"


class NotConfigured(ConfigurationError):
    """An endpoint lacks what it needs to run (``missing``: "endpoint id", "API key", ...)."""

    def __init__(self, message: str, missing: list[str] | None = None) -> None:
        super().__init__(message)
        self.missing = list(missing or [])


class ProviderNotInstalled(BrokerError, ImportError):
    """A provider's optional SDK is missing; the message carries the install hint."""

    code = "provider_not_installed"


class UnknownProvider(BrokerError, KeyError):
    code = "unknown_provider"

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class ProviderError(BrokerError):
    """A provider failed to serve a job. ``retryable`` tells the manager whether to try again."""

    code = "provider_error"
    retryable: bool = True

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
        status_code: int | None = None,
        job_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.provider = provider
        if retryable is not None:
            self.retryable = retryable
        self.retry_after = retry_after
        self.status_code = status_code
        self.job_id = job_id

    def to_dict(self) -> dict[str, Any]:
        out = {**super().to_dict(), "retryable": self.retryable}
        if self.provider:
            out["provider"] = self.provider
        if self.retry_after is not None:
            out["retry_after"] = self.retry_after
        return out


class ProviderUnavailable(ProviderError):
    """The provider cannot take work now: down, no workers, stuck queue, unreachable."""

    code = "provider_unavailable"


class RateLimited(ProviderError):
    """HTTP 429 or equivalent; ``retry_after`` seconds when the provider said."""

    code = "rate_limited"


class ProviderTimeout(ProviderError):
    """The job did not finish within the deadline we gave it."""

    code = "provider_timeout"


class JobLost(ProviderError):
    """The provider no longer knows the job (expired, worker died, 404 on status)."""

    code = "job_lost"


class JobFailed(ProviderError):
    """The job ran and the worker reported an error."""

    code = "job_failed"


class BadOutput(ProviderError):
    """The provider returned something that is not a valid result (silent, truncated, NaN)."""

    code = "bad_output"


class AuthenticationFailed(ProviderError):
    """The provider rejected our credentials. Retrying the same provider cannot help."""

    code = "authentication_failed"
    retryable = False


class JobCancelled(BrokerError):
    code = "cancelled"


class BudgetExceeded(BrokerError):
    """Dispatching would exceed a per-job or rolling budget; nothing was spent."""

    code = "budget_exceeded"


class AllProvidersFailed(BrokerError):
    """Every provider in the chain failed; ``attempts`` records each one."""

    code = "all_providers_failed"

    def __init__(self, message: str, attempts: Sequence[Attempt] = ()) -> None:
        lines = [message]
        for a in attempts:
            lines.append(f"  {a.provider}: {a.outcome} {a.error_class or ''} {a.message or ''}".rstrip())
        super().__init__("\n".join(lines))
        self.attempts = list(attempts)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "attempts": [a.model_dump() for a in self.attempts]}


class PieceFailed(AllProvidersFailed):
    """One piece of a long job failed on every provider; the job stopped (finished pieces are kept)."""

    code = "piece_failed"

    def __init__(self, message: str, attempts: Sequence[Attempt] = (), *, piece: int | None = None,
                 partial: str | None = None) -> None:
        super().__init__(message, attempts)
        self.piece = piece
        self.partial = partial


class BudgetStopped(BudgetExceeded):
    """A long job reached its ``max_usd`` and stopped cleanly: partial output kept, resumable."""

    code = "budget_stopped"

    def __init__(self, message: str, *, spent_usd: float = 0.0, partial: str | None = None) -> None:
        super().__init__(message)
        self.spent_usd = spent_usd
        self.partial = partial


class OutputNotKept(BrokerError):
    """The provider finished (and billed) the job, but the caller's output sink failed to keep it (a full
    disk, a bucket that refused the write). Not retried elsewhere: that would bill the same work twice."""

    code = "output_not_kept"


_BY_NAME: dict[str, type[BrokerError]] = {}


def _collect(cls: type[BrokerError]) -> None:
    _BY_NAME[cls.__name__] = cls
    for sub in cls.__subclasses__():
        _collect(sub)


def error_from_dict(data: dict[str, Any], *, provider: str | None = None) -> BrokerError:
    """Rebuild an error a worker sent over the wire, keeping its class where we know it."""
    if not _BY_NAME:
        _collect(BrokerError)
    name = str(data.get("type", ""))
    message = str(data.get("message", "worker error"))
    cls = _BY_NAME.get(name)
    if cls is InvalidRequest:
        field = str(data.get("field", "input"))
        prefix = f"{field}: "
        return InvalidRequest(field, message[len(prefix) :] if message.startswith(prefix) else message)
    if cls is not None and issubclass(cls, ProviderError):
        return cls(message, provider=provider, retryable=data.get("retryable"))
    if cls is EngineUnavailable:
        return EngineUnavailable(message)
    if cls is not None and cls not in (AllProvidersFailed,):
        try:
            return cls(message)
        except TypeError:
            pass
    # Unknown worker errors are job failures: another provider may well succeed.
    return JobFailed(message, provider=provider)
