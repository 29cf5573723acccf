"""What each built-in kind needs before it can be routed, checked without importing its adapter.

Each check returns the typed error saying what is missing (or None when the endpoint has what it needs).
The adapters' ``from_settings`` raise it; routing asks first, so an endpoint nobody configured costs
neither its adapter module nor httpx (~15 MB and ~50 ms of every CLI start that runs on local).
"""

from __future__ import annotations

import importlib.util
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from broker.endpoint_config import section_label
from broker.errors import BrokerError, NotConfigured, ProviderNotInstalled

Unmet = Callable[[Any, str, Mapping[str, Any], bool], BrokerError | None]


def runpod_unmet(rp: Any, name: str, overrides: Mapping[str, Any], routed: bool = True) -> BrokerError | None:
    section, env = section_label(name, "runpod")
    missing: dict[str, str] = {}
    if not (overrides.get("endpoint_id") or rp.endpoint_id):
        missing["endpoint id"] = (f"an endpoint id ({section} endpoint_id or {env}ENDPOINT_ID; "
                                  "`broker deploy runpod` writes it)")
    if not (overrides.get("api_key") or rp.api_key):
        missing["API key"] = "an API key (RUNPOD_API_KEY)"
    if missing:
        return NotConfigured(f"RunPod endpoint {name!r} is not configured: it needs " + " and ".join(
            missing.values()), list(missing))
    return None


def modal_token_configured(section: Any = None) -> bool:
    """True when the SDK has credentials: our settings, MODAL_TOKEN_ID/SECRET, or a profile in ~/.modal.toml.

    Reads files only; never touches the network or imports the SDK.
    """
    if section is not None and section.token_id and section.token_secret:
        return True
    if os.environ.get("MODAL_TOKEN_ID") and os.environ.get("MODAL_TOKEN_SECRET"):
        return True
    path = Path(os.environ.get("MODAL_CONFIG_PATH") or "~/.modal.toml").expanduser()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return False
    profiles = [v for v in data.values() if isinstance(v, dict)]
    wanted = os.environ.get("MODAL_PROFILE")
    if wanted:
        profiles = [data[wanted]] if isinstance(data.get(wanted), dict) else []
    return any(p.get("token_id") and p.get("token_secret") for p in profiles)


def modal_unmet(m: Any, name: str, overrides: Mapping[str, Any], routed: bool = True) -> BrokerError | None:
    """HTTP path when ``url`` and a proxy auth token are set, else the SDK path (installed, with a token).

    ``routed``: routing builds it, so the app must be named: a Modal token alone, made for other projects,
    does not mean broker's app is deployed there."""
    section, env = section_label(name, "modal")
    url = overrides.get("url", m.url)
    use_http = bool(url and overrides.get("proxy_key", m.proxy_key) and overrides.get("proxy_secret", m.proxy_secret))
    if routed and not url and "app_name" not in m.model_fields_set and "app_name" not in overrides:
        return NotConfigured(f"Modal endpoint {name!r} names no app: set {section} app_name ({env}APP_NAME; "
                             "`broker deploy modal` writes it) or url", ["app"])
    if not use_http and "lookup" not in overrides:
        if importlib.util.find_spec("modal") is None:
            return ProviderNotInstalled("provider 'modal' needs the modal SDK: pip install 'broker[modal]'")
        if not modal_token_configured(m):
            return NotConfigured(
                "Modal has no credentials: run `modal token new` (writes ~/.modal.toml) or set "
                f"MODAL_TOKEN_ID and MODAL_TOKEN_SECRET; or set {section} url with a proxy auth token "
                f"({env}PROXY_KEY / {env}PROXY_SECRET)", ["Modal token"]
            )
    return None


def replicate_unmet(cfg: Any, name: str, overrides: Mapping[str, Any], routed: bool = True) -> BrokerError | None:
    section, env = section_label(name, "replicate")
    missing: dict[str, str] = {}
    if cfg.api_token is None and "api_token" not in overrides:
        missing["API token"] = "an API token (REPLICATE_API_TOKEN)"
    if not any(overrides.get(k) or getattr(cfg, k) for k in ("deployment", "model", "version")):
        missing["deployment"] = (f"a deployment, model or version ({section} deployment or {env}DEPLOYMENT; "
                                 "`broker deploy replicate` writes it)")
    if missing:
        return NotConfigured(f"Replicate endpoint {name!r} is not configured: it needs "
                             + " and ".join(missing.values()), list(missing))
    return None


def http_unmet(cfg: Any, name: str, overrides: Mapping[str, Any], routed: bool = True) -> BrokerError | None:
    section, env = section_label(name, "http")
    if not overrides.get("url", cfg.url) and not list(overrides.get("urls", cfg.urls)):
        return NotConfigured(
            f"the http endpoint {name!r} needs the worker's address: set {section} url ({env}URL), "
            f"e.g. http://gpu-box:8000 where `broker worker serve` runs, or {section} urls for a pool", ["url"]
        )
    return None


#: the check of each built-in kind (plugins are asked by building them)
UNMET: dict[str, Unmet] = {"runpod": runpod_unmet, "modal": modal_unmet, "replicate": replicate_unmet,
                           "http": http_unmet}

__all__ = ["UNMET", "http_unmet", "modal_token_configured", "modal_unmet", "replicate_unmet", "runpod_unmet"]
