"""Price catalog and performance profiles: data with a source and a date, and the quotes built from them.

``broker/data/prices.csv`` holds one row per provider × hardware ($/s, minimum billed seconds,
typical cold start, what is billed); ``broker/data/profiles.csv`` holds how fast each engine runs
on each class of hardware (real-time factor for speech, frames/s for renders), each figure marked
measured / published / estimate. ``Settings.prices_path`` (and ``manager.profiles_path``) name CSVs
with the same columns that are merged over the packaged ones; ``http.usd_per_hour`` prices a
self-hosted worker by the hour of its machine.

``Catalog.settle(provider, hardware, billing)`` prices what a provider's job reports (``Job.billing``:
seconds by the provider's own rules); providers never price themselves. Hardware with no price row
costs ``None`` (unknown), never $0, unless ``manager.unknown_price_usd_per_hour`` prices it.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.errors import ConfigurationError
from broker.media import frames_for
from broker.types import Quote, RenderRequest, SpeechRequest, estimate_speech_seconds

if TYPE_CHECKING:
    from broker.providers.base import Billing, Provider
    from broker.settings import Settings

SCHEMA_VERSION = 1
DEFAULT_ENGINE = "piper"
#: chance a worker that was used within its idle window is still warm
WARM_P_COLD = 0.1


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def _flag(value: str | None, default: bool) -> bool:
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "y")


def _num(value: str | None, default: float) -> float:
    if value is None or value.strip() == "":
        return default
    return float(value)


@dataclass(frozen=True)
class PriceRow:
    """What one provider charges for one kind of hardware, and how it counts the seconds."""

    provider: str
    hardware: tuple[str, ...]
    profile: str
    usd_per_second: float
    min_billed_s: float = 0.0
    increment_s: float = 1.0
    cold_start_s: float = 0.0
    #: how long a worker stays up after a job (billed when ``bills_idle``)
    idle_s: float = 0.0
    bills_cold_start: bool = True
    bills_idle: bool = True
    basis: str = "estimate"
    billing_model: str = ""
    source: str = ""
    checked: str = ""

    def billed_seconds(self, seconds: float) -> float:
        """Seconds the provider charges for ``seconds`` of billable time (increments, minimum)."""
        seconds = max(0.0, seconds)
        if self.increment_s > 0 and seconds > 0:
            seconds = math.ceil(seconds / self.increment_s - 1e-9) * self.increment_s
        return max(seconds, self.min_billed_s) if seconds > 0 else 0.0

    def cost(self, seconds: float) -> float:
        return self.billed_seconds(seconds) * self.usd_per_second

    def billable_seconds(self, run_s: float, cold_start_s: float = 0.0, idle_s: float | None = None) -> float:
        """Worker seconds one job pays for: its run, plus the cold start and the idle tail where they are
        billed (``idle_s`` overrides the row's idle window, e.g. a configured idle timeout)."""
        idle = self.idle_s if idle_s is None else idle_s
        return run_s + (cold_start_s if self.bills_cold_start else 0.0) + (idle if self.bills_idle else 0.0)

    @property
    def scales_to_zero(self) -> bool:
        return self.cold_start_s > 0


@dataclass(frozen=True)
class PerfProfile:
    engine: str
    task: str
    hardware: str
    metric: str  # "rtf" or "fps"
    value: float
    basis: str = "estimate"
    source: str = ""
    checked: str = ""


def _read_csv(text: str, origin: str) -> Iterator[dict[str, str]]:
    lines = text.splitlines()
    for line in lines:
        found = re.search(r"schema_version=(\d+)", line) if line.startswith("#") else None
        if found:
            version = int(found.group(1))
            if version > SCHEMA_VERSION:
                raise ConfigurationError(
                    f"{origin} has schema_version={version}; this broker reads up to {SCHEMA_VERSION}"
                )
    body = "\n".join(line for line in lines if line.strip() and not line.lstrip().startswith("#"))
    yield from csv.DictReader(io.StringIO(body))


def parse_prices(text: str, origin: str = "prices") -> list[PriceRow]:
    rows = []
    for n, raw in enumerate(_read_csv(text, origin), start=2):
        try:
            provider = _key(raw["provider"])
            aliases = tuple(_key(a) for a in raw["hardware"].split("|") if a.strip())
            usd = _num(raw.get("usd_per_second"), math.nan)
            if not math.isfinite(usd) and raw.get("usd_per_hour"):
                usd = _num(raw.get("usd_per_hour"), 0.0) / 3600.0
            if not aliases or not math.isfinite(usd) or usd < 0:
                raise ValueError("needs provider, hardware and a non-negative usd_per_second")
            rows.append(PriceRow(
                provider=provider,
                hardware=aliases,
                profile=(raw.get("profile") or "").strip() or ("cpu" if aliases[0].startswith("cpu") else "gpu"),
                usd_per_second=usd,
                min_billed_s=_num(raw.get("min_billed_s"), 0.0),
                increment_s=_num(raw.get("increment_s"), 1.0),
                cold_start_s=_num(raw.get("cold_start_s"), 0.0),
                idle_s=_num(raw.get("idle_s"), 0.0),
                bills_cold_start=_flag(raw.get("bills_cold_start"), True),
                bills_idle=_flag(raw.get("bills_idle"), True),
                basis=(raw.get("basis") or "estimate").strip(),
                billing_model=(raw.get("billing_model") or "").strip(),
                source=(raw.get("source") or "").strip(),
                checked=(raw.get("checked") or "").strip(),
            ))
        except (KeyError, ValueError, AttributeError) as exc:
            raise ConfigurationError(f"{origin} line {n}: {exc}") from None
    return rows


def parse_profiles(text: str, origin: str = "profiles") -> list[PerfProfile]:
    rows = []
    for n, raw in enumerate(_read_csv(text, origin), start=2):
        try:
            metric = raw["metric"].strip()
            if metric not in ("rtf", "fps"):
                raise ValueError(f"metric must be rtf or fps, not {metric!r}")
            value = float(raw["value"])
            if not value > 0:
                raise ValueError("value must be positive")
            rows.append(PerfProfile(
                engine=raw["engine"].strip().lower(), task=raw["task"].strip(), hardware=_key(raw["hardware"]),
                metric=metric, value=value, basis=(raw.get("basis") or "estimate").strip(),
                source=(raw.get("source") or "").strip(), checked=(raw.get("checked") or "").strip(),
            ))
        except (KeyError, ValueError, AttributeError) as exc:
            raise ConfigurationError(f"{origin} line {n}: {exc}") from None
    return rows


def _packaged(name: str) -> str:
    return resources.files("broker").joinpath("data", name).read_text(encoding="utf-8")


def _read_path(path: str | Path, what: str) -> str:
    p = Path(path).expanduser()
    try:
        return p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what} {p}: {exc.strerror}") from None


class Catalog:
    """Prices and speed profiles, looked up by (provider, hardware) and (engine, hardware class)."""

    def __init__(self, prices: Iterable[PriceRow] = (), profiles: Iterable[PerfProfile] = (), *,
                 unknown_usd_per_second: float | None = None) -> None:
        self._prices: dict[tuple[str, str], PriceRow] = {}
        self._profiles: dict[tuple[str, str], PerfProfile] = {}
        #: what hardware with no price row costs (None: unknown, and such providers skip budgeted jobs)
        self.unknown_usd_per_second = unknown_usd_per_second
        self.add_prices(prices)
        self.add_profiles(profiles)

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def packaged(cls) -> Catalog:
        return cls(parse_prices(_packaged("prices.csv"), "prices.csv"),
                   parse_profiles(_packaged("profiles.csv"), "profiles.csv"))

    @classmethod
    def from_settings(cls, settings: Settings) -> Catalog:
        """Packaged data, then ``prices_path`` / ``manager.profiles_path``, then settings-priced rows."""
        cat = cls.packaged()
        fallback = getattr(settings.manager, "unknown_price_usd_per_hour", None)
        cat.unknown_usd_per_second = None if fallback is None else fallback / 3600.0
        if settings.prices_path:
            cat.add_prices(parse_prices(_read_path(settings.prices_path, "prices_path"), str(settings.prices_path)))
        profiles_path = getattr(settings.manager, "profiles_path", None)
        if profiles_path:
            cat.add_profiles(parse_profiles(_read_path(profiles_path, "profiles_path"), str(profiles_path)))
        http = settings.http
        if http.usd_per_hour is not None:
            hw = _key(http.hardware)
            base = cat.price("http", hw)
            cat.add_prices([PriceRow(
                provider="http", hardware=(hw,), profile=base.profile if base else ("cpu" if hw.startswith("cpu")
                                                                                   else "gpu"),
                usd_per_second=http.usd_per_hour / 3600.0, min_billed_s=0.0, cold_start_s=0.0, idle_s=0.0,
                bills_cold_start=False, bills_idle=False, basis="config",
                billing_model=f"http.usd_per_hour = {http.usd_per_hour:g}: jobs pay their share of run time",
            )])
        return cat

    def add_prices(self, rows: Iterable[PriceRow]) -> Catalog:
        for row in rows:
            for alias in row.hardware:
                self._prices[(row.provider, alias)] = row
        return self

    def add_profiles(self, rows: Iterable[PerfProfile]) -> Catalog:
        for p in rows:
            self._profiles[(p.engine, p.hardware)] = p
        return self

    def with_prices(self, rows: Iterable[PriceRow]) -> Catalog:
        """A copy with ``rows`` merged over this catalog's prices."""
        out = Catalog(self.prices(), self._profiles.values(), unknown_usd_per_second=self.unknown_usd_per_second)
        return out.add_prices(rows)

    # -- lookups ------------------------------------------------------------------------------
    def prices(self) -> list[PriceRow]:
        seen: dict[int, PriceRow] = {}
        for row in self._prices.values():
            seen.setdefault(id(row), row)
        return list(seen.values())

    def profiles(self) -> list[PerfProfile]:
        return list(self._profiles.values())

    def price(self, provider: str, hardware: str) -> PriceRow | None:
        """The row for ``hardware`` at ``provider``; without one, the configured fallback price (or None)."""
        row = self._prices.get((_key(provider), _key(hardware)))
        if row is None and self.unknown_usd_per_second is not None:
            hw = _key(hardware)
            row = PriceRow(provider=_key(provider), hardware=(hw,), profile="cpu" if hw.startswith("cpu") else "gpu",
                           usd_per_second=self.unknown_usd_per_second, basis="config",
                           billing_model="no price row: manager.unknown_price_usd_per_hour")
        return row

    def profile(self, engine: str, hardware_class: str) -> PerfProfile | None:
        engine = engine.lower()
        hw = _key(hardware_class)
        found = self._profiles.get((engine, hw))
        if found is None:
            family = "cpu" if hw.startswith("cpu") or hw == "local-cpu" else "gpu"
            found = self._profiles.get((engine, family))
        return found

    def cost(self, provider: str, hardware: str, billed_seconds: float) -> float | None:
        """Dollars for ``billed_seconds``; None when the hardware has no price (unknown is not free)."""
        row = self.price(provider, hardware)
        return row.cost(billed_seconds) if row is not None else None

    def settle(self, provider: str, hardware: str, billing: Billing) -> tuple[float, float | None]:
        """(billed seconds, dollars or None if unpriced) for what a job's provider reported.

        Never below the provider's metrics: its billed seconds, plus the cold start it shows (capped at
        the row's typical cold start, where the row bills cold starts), and never below a dollar figure
        the provider stated itself."""
        row = self.price(provider, hardware)
        seconds = max(0.0, billing.billed_seconds)
        cold = billing.cold_start_seconds
        if cold and row is not None and row.bills_cold_start:
            seconds += min(cold, row.cold_start_s) if row.cold_start_s > 0 else cold
        if row is None:
            return seconds, billing.cost_usd
        cost = row.cost(seconds)
        if billing.cost_usd is not None:
            cost = max(cost, billing.cost_usd)
        return row.billed_seconds(seconds), cost

    # -- quotes -------------------------------------------------------------------------------
    def run_seconds(self, request: SpeechRequest | RenderRequest, hardware_class: str,
                    default_engine: str = DEFAULT_ENGINE) -> tuple[float, str]:
        """Expected compute seconds for ``request`` on ``hardware_class`` and the basis of that figure."""
        engine = request.engine or default_engine
        if isinstance(request, SpeechRequest):
            return self._speech_seconds(engine, speech_audio_seconds(request), hardware_class)
        audio_s = request.audio_seconds_hint()
        seconds, basis = 0.0, "measured"
        if request.audio is None:
            seconds, basis = self._speech_seconds(engine, audio_s, hardware_class)
        prof = self.profile("render", hardware_class)
        fps = prof.value if prof else 25.0
        seconds += frames_for(audio_s, request.fps) / fps
        return seconds, _weaker(basis, prof.basis if prof else "estimate")

    def _speech_seconds(self, engine: str, audio_s: float, hardware_class: str) -> tuple[float, str]:
        prof = self.profile(engine, hardware_class)
        if prof is None:
            return audio_s, "estimate"  # unknown engine: assume real time
        return audio_s * prof.value, prof.basis

    def quote(
        self,
        provider: str,
        hardware: str,
        request: SpeechRequest | RenderRequest,
        *,
        default_engine: str = DEFAULT_ENGINE,
        p_cold: float | None = None,
        queue_s: float = 0.0,
    ) -> Quote:
        """Expected seconds (queue + cold start × P(cold) + run) and dollars for ``request``.

        ``p_cold`` defaults to 1 for providers that scale to zero (nothing known about their warmth)
        and 0 for always-on ones; the manager passes what it has observed.
        """
        row = self.price(provider, hardware)
        hw_class = row.profile if row else ("cpu" if _key(hardware).startswith("cpu") else "gpu")
        run_s, basis = self.run_seconds(request, hw_class, default_engine)
        cold_start = row.cold_start_s if row else 0.0
        pc = (1.0 if cold_start > 0 else 0.0) if p_cold is None else min(1.0, max(0.0, p_cold))
        cold_s = pc * cold_start
        expected_s = queue_s + cold_s + run_s
        breakdown: dict[str, float] = {"queue": queue_s, "cold_start": cold_s, "run": run_s, "p_cold": pc}
        usd = 0.0
        if row is None:
            breakdown["unpriced"] = 1.0
        else:
            billable = row.billable_seconds(run_s, cold_s)
            usd = row.cost(billable)
            breakdown.update(billed_s=row.billed_seconds(billable), usd_per_second=row.usd_per_second)
        return Quote(provider=provider, hardware=hardware, expected_seconds=expected_s, expected_usd=usd,
                     breakdown=breakdown, basis=basis)


_BASIS_ORDER = {"measured": 0, "published": 1, "config": 1, "estimate": 2}


def _weaker(a: str, b: str) -> str:
    return a if _BASIS_ORDER.get(a, 3) >= _BASIS_ORDER.get(b, 3) else b


def speech_audio_seconds(request: SpeechRequest) -> float:
    """How much audio a speech request should produce: the text's length, capped by ``max_length_ms``."""
    seconds = estimate_speech_seconds(request.text)
    if request.max_length_ms is not None:
        seconds = min(seconds, request.max_length_ms / 1000.0)
    return seconds


# -- the module-level contract --------------------------------------------------------------------
_default: Catalog | None = None


def default_catalog() -> Catalog:
    """The catalog built from ``Settings()`` (packaged data if settings cannot be read)."""
    global _default
    if _default is None:
        try:
            from broker.settings import Settings

            _default = Catalog.from_settings(Settings())
        except ConfigurationError:
            raise
        except Exception:  # settings unreadable: prices still work from the packaged data
            _default = Catalog.packaged()
    return _default


def set_default_catalog(catalog: Catalog | None) -> None:
    """Replace (or with None, reset) the catalog ``cost_for``/``quote_for`` use."""
    global _default
    _default = catalog


def quote_for(provider: Provider, request: SpeechRequest | RenderRequest, **kwargs: Any) -> Quote:
    """Expected $ and seconds for ``request`` on ``provider``: priced by its kind and hardware, named by its
    endpoint name."""
    q = default_catalog().quote(provider.kind, provider.capabilities.hardware, request, **kwargs)
    return q.model_copy(update={"provider": provider.name})


def cost_for(provider: str, hardware: str, billed_seconds: float) -> float | None:
    """Dollars for ``billed_seconds`` of ``hardware`` at ``provider`` from the catalog (None when unknown)."""
    return default_catalog().cost(provider, hardware, billed_seconds)


__all__ = [
    "Catalog",
    "PerfProfile",
    "PriceRow",
    "cost_for",
    "default_catalog",
    "parse_prices",
    "parse_profiles",
    "quote_for",
    "set_default_catalog",
    "speech_audio_seconds",
]
