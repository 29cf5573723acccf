"""Provider kind → lazy import path + install hint.

Nothing here imports a provider module until it is asked for, so ``import broker``
stays free of SDKs. A missing optional dependency becomes ``ProviderNotInstalled``
carrying the exact ``pip install`` line. Third parties can add providers through
the ``broker.providers`` entry-point group.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from broker import entry_points
from broker.errors import ProviderNotInstalled, UnknownProvider

if TYPE_CHECKING:
    from broker.providers.base import Provider
    from broker.settings import Settings


@dataclass(frozen=True)
class Entry:
    path: str
    hint: str
    description: str
    #: modules the adapter imports at its top (checked without importing them: ``installed``)
    requires: tuple[str, ...] = ()


REGISTRY: dict[str, Entry] = {
    "local": Entry(
        "broker.providers.local:LocalProvider",
        "pip install 'broker[local]'",
        "the engines in this process, on CUDA if present, else CPU",
    ),
    "runpod": Entry(
        "broker.providers.runpod:RunPodProvider",
        "pip install 'broker[runpod]'",
        "RunPod serverless endpoint (queue API)",
        ("httpx",),
    ),
    "modal": Entry(
        "broker.providers.modal:ModalProvider",
        "pip install 'broker[modal]'",
        "Modal app (SDK or its HTTPS endpoint)",
        ("httpx",),
    ),
    "replicate": Entry(
        "broker.providers.replicate:ReplicateProvider",
        "pip install 'broker[replicate]'",
        "Replicate deployment, model or version",
        ("httpx",),
    ),
    "http": Entry(
        "broker.providers.http:HTTPProvider",
        "pip install broker",
        "a self-hosted `broker worker serve` over HTTP",
        ("httpx",),
    ),
}


def _entry_point_entries() -> dict[str, Entry]:
    return {name: Entry(value, f"pip install the package providing {name!r}", "plugin")
            for name, value in entry_points.group("broker.providers").items()}


def refresh() -> None:
    """Forget the plugin kinds found so far (they are looked up again on next use)."""
    entry_points.forget()


def names() -> list[str]:
    return sorted({*REGISTRY, *_entry_point_entries()})


def entry(name: str) -> Entry:
    if name in REGISTRY:  # built-in kinds win over plugins of the same name
        return REGISTRY[name]
    table = {**_entry_point_entries(), **REGISTRY}
    try:
        return table[name]
    except KeyError:
        raise UnknownProvider(f"unknown provider kind {name!r}; known: {', '.join(sorted(table))}") from None


def installed(name: str) -> bool:
    """Could the adapter of kind ``name`` be imported? Asked of the import system, importing nothing."""
    e = entry(name)
    try:
        return all(importlib.util.find_spec(m) is not None for m in (e.path.partition(":")[0], *e.requires))
    except (ImportError, ValueError):  # a parent package that fails, or a module marked missing
        return False


def provider_class(name: str) -> type[Provider]:
    """Import the provider's class; a missing dependency raises with the install hint."""
    e = entry(name)
    module_name, _, attr = e.path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ProviderNotInstalled(f"provider {name!r} needs {exc.name or exc}: {e.hint}") from None
    cls: type[Provider] = getattr(module, attr)
    return cls


def create(name: str, settings: Settings | None = None, **overrides: Any) -> Provider:
    """Build the provider of endpoint (or kind) ``name`` from settings (``Settings()`` when not given)."""
    from broker.providers.endpoints import create as create_endpoint
    from broker.providers.endpoints import match, specs
    from broker.settings import Settings

    settings = settings or Settings()
    if name != "local":
        table = specs(settings)
        found = match(name, table)
        if found:
            kind, config = table[found[0]]
            return create_endpoint(found[0], kind, config, settings, **overrides)
    cls = provider_class(name)
    factory = getattr(cls, "from_settings", None)
    if factory is None:
        return cls(**overrides)
    return factory(settings, **overrides)  # type: ignore[no-any-return]
