"""Endpoint configuration pieces shared by the settings models: names, comma lists, [endpoints.NAME].

Kept apart from ``broker.settings`` (which re-exports them) so that file stays the list of sections.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_settings import NoDecode

from broker.redact import redact_urls

#: an endpoint or provider name: what `manager.providers`, `--provider` and the ledger use
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: the kinds with a one-per-kind section of their own ([runpod], [modal], ...): each is also an endpoint
SECTION_KINDS = ("runpod", "modal", "replicate", "http")


def name_list(value: Any) -> Any:
    """A list of names from TOML/JSON (``["runpod", "local"]``) or the comma form (``runpod,local``)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except ValueError:
            raise ValueError(f"{text!r} is neither a JSON list nor comma-separated names") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{text!r} must be a list of names")
        return value
    names = [part.strip() for part in text.split(",")]
    if text and any(not n for n in names):
        raise ValueError(f"{text!r} has an empty name (write names separated by commas: runpod,local)")
    return [n for n in names if n]


def check_names(names: list[str] | None) -> list[str] | None:
    for n in names or ():
        if not NAME_PATTERN.match(n):
            raise ValueError(f"{n!r} is not an endpoint name (letters, digits, '-', '_', '.')")
    return names


#: a list that also reads the comma form from the environment (`BROKER_MANAGER__PROVIDERS=runpod,local`)
CommaList = Annotated[list[str], NoDecode, BeforeValidator(name_list)]
OptionalCommaList = Annotated[list[str] | None, NoDecode, BeforeValidator(name_list)]


def section_label(name: str, kind: str) -> tuple[str, str]:
    """Where an endpoint's keys live, for messages: ("[runpod]", "BROKER_RUNPOD__") or the named form."""
    if name == kind and kind in SECTION_KINDS:
        return f"[{kind}]", f"BROKER_{kind.upper()}__"
    return f"[endpoints.{name}]", f"BROKER_ENDPOINTS__{name.upper().replace('-', '_')}__"


class RedactingModel(BaseModel):
    """A settings section whose repr masks the password of any URL it holds."""

    def __repr__(self) -> str:
        return redact_urls(super().__repr__())

    def __str__(self) -> str:
        return redact_urls(super().__str__())


class EndpointOptions(RedactingModel):
    """Keys every endpoint has, whatever its kind: what it can run, how much at once, where."""

    #: the provider kind of an [endpoints.NAME] table (the one-per-kind sections leave it unset)
    kind: str | None = None
    #: engines the endpoint's image carries; None = every engine a broker worker has
    engines: OptionalCommaList = None
    #: tasks it takes ("speech", "render"); None = both
    tasks: OptionalCommaList = None
    #: jobs it may run at once; None = what the kind's own scaling keys say (workers_max, max_containers, ...)
    max_concurrency: int | None = Field(default=None, ge=1)
    #: a label shown by `broker providers` (e.g. "eu-west"); routing does not read it
    region: str | None = None


class PluginEndpointSettings(EndpointOptions):
    """An endpoint of a plugin kind (``broker.providers`` entry point): its keys go to the plugin as given."""

    model_config = ConfigDict(extra="allow")

    hardware: str = "cpu"


#: the settings model of each built-in kind; [endpoints.NAME] tables are validated with their kind's model
KIND_SETTINGS: dict[str, type[EndpointOptions]] = {}


def endpoint_tables(raw: Any) -> dict[str, EndpointOptions]:
    """[endpoints.NAME] tables (TOML or BROKER_ENDPOINTS__NAME__KEY) → each kind's settings model.

    Environment names are upper case with underscores; ``BROKER_ENDPOINTS__RP_CPU__ENDPOINT_ID`` sets
    ``[endpoints.rp-cpu]`` when the file names it so (the environment's value wins, as everywhere).
    """
    if not isinstance(raw, dict):
        raise ValueError("endpoints must be a table of [endpoints.NAME] tables")
    merged: dict[str, dict[str, Any]] = {}
    spelled: dict[str, str] = {}
    # The env spelling (rp_cpu) sorts after the file's (rp-cpu) here, so its values are applied last.
    for name in sorted(raw, key=lambda n: "_" in n):
        table = raw[name]
        if isinstance(table, EndpointOptions):
            merged[name], spelled[name] = {"__model__": table}, name
            continue
        if not isinstance(table, dict):
            raise ValueError(f"[endpoints.{name}] must be a table of keys")
        key = name.lower().replace("_", "-")
        shown = spelled.setdefault(key, name)
        merged.setdefault(shown, {}).update(table)
    out: dict[str, EndpointOptions] = {}
    for name, table in merged.items():
        if not NAME_PATTERN.match(name) or name in ("local", "manager"):
            raise ValueError(f"{name!r} cannot name an endpoint (letters, digits, '-', '_', '.'; not local)")
        if "__model__" in table:
            out[name] = table["__model__"]
            continue
        table = dict(table)
        kind = str(table.pop("kind", "") or (name if name in SECTION_KINDS else "")).strip().lower()
        if not kind:
            raise ValueError(f"[endpoints.{name}] needs kind = \"runpod\" | \"modal\" | \"replicate\" | \"http\" "
                             "| a plugin kind")
        model = KIND_SETTINGS.get(kind, PluginEndpointSettings)
        try:
            cfg = model(**table)
        except ValidationError as exc:
            raise ValueError(f"[endpoints.{name}] " + errors_line(exc)) from None
        cfg.kind = kind
        out[name] = cfg
    return out


def errors_line(exc: ValidationError) -> str:
    """Pydantic's errors as one line: ``manager.providers: '[runpod' is neither ...; local.concurrency: ...``."""
    parts = []
    for e in exc.errors(include_url=False):
        where = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        msg = str(e["msg"]).removeprefix("Value error, ")
        shown = e.get("input")
        if e["type"] not in ("value_error", "missing") and isinstance(shown, str | int | float):
            msg += f" (got {shown!r})"
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts).replace("\n", " ")


