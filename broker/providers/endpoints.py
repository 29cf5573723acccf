"""Endpoints: the configured instances of provider kinds, and which of them a manager routes to.

An endpoint is a name, a kind and that kind's settings: ``[endpoints.rp-cpu] kind = "runpod"``, or one
of the one-per-kind sections (``[runpod]`` is the endpoint named ``runpod``). ``resolve`` turns the
configuration into providers and says, for every endpoint it did not route to, why not (not installed,
missing a key or an id, excluded by ``manager.providers``, local switched off). Price rows key on the
provider's ``kind`` + hardware; routing, health, budgets and the ledger key on its ``name``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from broker.errors import BrokerError, ConfigurationError, NotConfigured, ProviderNotInstalled, UnknownProvider
from broker.providers import registry
from broker.providers.readiness import UNMET

if TYPE_CHECKING:
    from broker.providers.base import Provider
    from broker.settings import EndpointOptions, Settings

LOCAL = "local"


@dataclass
class EndpointStatus:
    """One row of `broker providers`: an endpoint, whether the manager routes to it, and why not."""

    name: str
    kind: str
    routed: bool
    #: "ranked" | "fallback" when routed
    role: str = ""
    #: why it is not routed, short ("missing endpoint id, API key", "not installed", "excluded ...")
    reason: str = ""
    #: the whole message behind ``reason`` (what to set, the install line)
    detail: str = ""
    region: str | None = None
    provider: Provider | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "routed": self.routed, "role": self.role,
                "reason": self.reason, "detail": self.detail, "region": self.region}


@dataclass
class Routing:
    """What a manager routes to: ranked endpoints, the local fallback, and every endpoint's status."""

    ranked: list[Provider] = field(default_factory=list)
    fallback: Provider | None = None
    rows: list[EndpointStatus] = field(default_factory=list)

    @property
    def skipped(self) -> dict[str, str]:
        return {r.name: r.detail or r.reason for r in self.rows if not r.routed}


def norm(name: str) -> str:
    """Names match whatever the spelling: ``rp-cpu``, ``rp_cpu`` and ``RP_CPU`` (its env form) are one."""
    return name.strip().lower().replace("_", "-")


def specs(settings: Settings) -> dict[str, tuple[str, EndpointOptions | None]]:
    """Every endpoint the settings describe (name → kind, settings), plus one per installed plugin kind."""
    found: dict[str, tuple[str, EndpointOptions | None]] = dict(settings.endpoint_configs())
    for kind in registry.names():
        if kind != LOCAL and kind not in found and kind not in registry.REGISTRY:
            found[kind] = (kind, None)
    return found


def create(name: str, kind: str, config: EndpointOptions | None, settings: Settings,
           **overrides: Any) -> Provider:
    """Build the provider of one endpoint; raises ``NotConfigured`` / ``ProviderNotInstalled`` saying why not."""
    cls = registry.provider_class(kind)
    factory = getattr(cls, "from_settings", None)
    if factory is None:
        provider = cls(**overrides)
    elif kind in registry.REGISTRY:
        provider = factory(settings, endpoint=name, config=config, **overrides)
    else:  # a plugin: its own keys from [endpoints.NAME] arrive as keyword arguments
        extra = dict(config.model_extra or {}) if config is not None else {}
        provider = factory(settings, **{**extra, **overrides})
    provider.name = name
    if provider.kind in ("", "provider"):
        provider.kind = kind
    if config is not None:
        _restrict(provider, config)
    return provider


def _restrict(provider: Provider, config: EndpointOptions) -> None:
    """Apply the endpoint's ``engines`` / ``tasks`` / ``max_concurrency`` over what its kind offers."""
    caps = provider.capabilities
    if config.engines is not None:
        caps = dataclasses.replace(caps, engines=frozenset(config.engines))
    if config.tasks is not None:
        caps = dataclasses.replace(caps, tasks=frozenset(config.tasks))
    provider.capabilities = caps
    if config.max_concurrency is not None:
        provider.max_concurrency = config.max_concurrency


def _short(exc: BrokerError) -> str:
    if isinstance(exc, NotConfigured) and exc.missing:
        return "missing " + ", ".join(exc.missing)
    if isinstance(exc, ProviderNotInstalled):
        return "not installed"
    if isinstance(exc, UnknownProvider):
        return "unknown kind"
    return "not configured"


def _build(name: str, kind: str, config: EndpointOptions | None, settings: Settings) -> EndpointStatus:
    region = getattr(config, "region", None)
    unmet = UNMET.get(kind)
    # an adapter that cannot be imported says so (its install hint) ahead of what its settings lack
    missing = unmet(config, name, {}, True) if unmet and config is not None and registry.installed(kind) else None
    if missing is not None:  # known without importing the adapter (or httpx)
        return EndpointStatus(name, kind, False, reason=_short(missing), detail=missing.message, region=region)
    try:
        provider = create(name, kind, config, settings)
    except BrokerError as exc:
        return EndpointStatus(name, kind, False, reason=_short(exc), detail=exc.message, region=region)
    return EndpointStatus(name, kind, True, role="ranked", region=region, provider=provider)


def match(name: str, table: dict[str, tuple[str, Any]]) -> list[str]:
    """Endpoint names ``name`` selects: that endpoint, else every endpoint of that kind."""
    exact = [n for n in table if norm(n) == norm(name)]
    if exact:
        return exact
    return [n for n, (kind, _) in table.items() if kind == norm(name)]


def select(name: str, table: dict[str, tuple[str, Any]], built: dict[str, EndpointStatus]) -> list[str]:
    """What ``name`` routes to: that endpoint if it is configured, else every configured endpoint of that
    kind (``runpod`` = [runpod] when it has an id, else the [endpoints.*] RunPod ones); when none is
    configured, the endpoint(s) it names, so their reason shows."""
    exact = [n for n in table if norm(n) == norm(name)]
    of_kind = [n for n, (kind, _) in table.items() if kind == norm(name) and n not in exact]
    usable = [n for n in exact if built[n].provider is not None] or \
        [n for n in of_kind if built[n].provider is not None]
    return usable or exact or of_kind


def resolve(settings: Settings, wanted: Sequence[Provider | str] | None = None) -> Routing:
    """The endpoints to route across: ``wanted`` (names, kinds or providers), else ``manager.providers``,
    else every configured endpoint; and local in the place ``manager.local`` gives it."""
    from broker.providers.base import Provider

    table = specs(settings)
    explicit = list(wanted) if wanted is not None else settings.manager.providers
    routing = Routing()
    built = {name: _build(name, kind, cfg, settings) for name, (kind, cfg) in table.items()}
    local: Provider | None = None
    listed = False
    chosen: list[Provider] = []
    if explicit is None:
        chosen = [s.provider for s in built.values() if s.provider is not None]
    else:
        picked: list[str] = []
        for item in explicit:
            if isinstance(item, Provider):
                if item.name == LOCAL:
                    local, listed = item, True
                else:
                    chosen.append(item)
                continue
            if norm(item) == LOCAL:
                listed = True  # local's place is manager.local's to say
                continue
            names = select(item, table, built)
            if not names:  # a typo would otherwise route silently to the rest: say so instead
                where = "manager.providers" if wanted is None else "the providers given"
                raise ConfigurationError(f"{where}: {unknown_message(item, built)}")
            picked += [n for n in names if n not in picked]
        given = {p.name for p in chosen}  # providers handed in as objects take their name's row
        chosen += [p for n in picked if (p := built[n].provider) is not None]
        source = "manager.providers" if wanted is None else "the providers given"
        for name, status in list(built.items()):
            if name in given:
                del built[name]
            elif name not in picked and status.routed:
                status.routed, status.role = False, ""  # still built: `broker providers` probes it
                status.reason = "excluded by manager.providers" if wanted is None else "excluded"
                status.detail = f"not in {source} ({', '.join(map(str, explicit))})"
        routing.rows += [EndpointStatus(p.name, p.kind, True, role="ranked", provider=p)
                         for p in chosen if p.name in given]
    routing.rows += built.values()
    _place_local(routing, settings, chosen, local, listed)
    return routing


def _place_local(routing: Routing, settings: Settings, chosen: list[Provider], local: Provider | None,
                 listed: bool) -> None:
    mode = settings.manager.local_mode(listed)
    row = EndpointStatus(LOCAL, LOCAL, False)
    if local is None and not settings.local.enabled:
        row.reason = row.detail = "disabled (local.enabled = false)"
    elif mode == "off":
        row.reason, row.detail = "off", "manager.local = \"off\""
    else:
        if local is None:
            try:
                local = registry.create(LOCAL, settings)
            except BrokerError as exc:
                row.reason, row.detail = _short(exc), exc.message
        if local is not None:
            row.routed, row.role, row.provider = True, mode, local
    routing.rows.insert(0, row)
    if row.provider is not None and mode == "ranked":
        routing.ranked = [*chosen, row.provider]  # ranked by price with the rest; the list order breaks ties
    else:
        routing.ranked = chosen
        routing.fallback = row.provider


def unknown_message(name: str, built: dict[str, EndpointStatus]) -> str:
    configured = [LOCAL] + [n for n, s in built.items() if s.provider is not None]
    others = [f"{n} ({s.reason})" for n, s in built.items() if s.provider is None]
    kinds = sorted({s.kind for s in built.values()} | set(registry.REGISTRY))
    text = f"no endpoint or provider kind is named {name!r}; configured endpoints: {', '.join(configured)}"
    if others:
        text += f"; not configured: {', '.join(others)}"
    return text + f"; kinds: {', '.join(kinds)}"


def require(settings: Settings, name: str) -> None:
    """Check that ``--provider NAME`` can run: raises ``ConfigurationError`` naming what is wrong."""
    if norm(name) == LOCAL:
        if not settings.local.enabled:
            raise ConfigurationError("local is disabled (local.enabled = false)")
        return
    table = specs(settings)
    built = {n: _build(n, kind, cfg, settings) for n, (kind, cfg) in table.items()}
    names = select(name, table, built)
    if not names:
        raise ConfigurationError(unknown_message(name, built))
    if not any(built[n].provider is not None for n in names):
        raise ConfigurationError("; ".join(built[n].detail for n in names))


__all__ = ["EndpointStatus", "Routing", "create", "match", "norm", "require", "resolve", "select", "specs"]
