"""Endpoints and what is routed: [endpoints.NAME] tables, configured means routed, local's place, and the
words `broker providers`, `broker quote` and `--provider` use when something is not routed.

Providers here are the real adapters built from settings (RunPod, Replicate, http, local); nothing is
sent anywhere: these tests plan and rank, they do not run cloud jobs (tests/test_endpoints_e2e.py does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from broker.cli import app
from broker.errors import ConfigurationError
from broker.routing.manager import CloudGPUManager
from broker.settings import Settings
from broker.testing.fake import FakeProvider, fake_catalog
from broker.types import RenderRequest, SpeechRequest
from tests.conftest import run_cli

TWO_RUNPODS = """
[endpoints.rp-cpu]
kind = "runpod"
endpoint_id = "cpu111"
hardware = "cpu"
engines = ["piper"]
workers_max = 6

[endpoints.rp-gpu]
kind = "runpod"
endpoint_id = "gpu222"
hardware = "A100-80GB"
engines = ["csm"]
tasks = ["speech"]
region = "eu"
"""


@pytest.fixture()
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Write a broker.toml and point BROKER_CONFIG at it; no provider credentials leak in from outside."""
    for var in ("RUNPOD_API_KEY", "REPLICATE_API_TOKEN", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET",
                "BROKER_WORKER_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(tmp_path / "no-modal.toml"))
    monkeypatch.setenv("BROKER_LEDGER__PATH", ":memory:")

    def write(text: str = "") -> Path:
        path = tmp_path / "broker.toml"
        path.write_text(text)
        monkeypatch.setenv("BROKER_CONFIG", str(path))
        return path

    write()
    return write


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def names(manager: CloudGPUManager) -> list[str]:
    return [p.name for p in manager.providers]


# -- settings -------------------------------------------------------------------------------------------
def test_endpoint_tables_from_the_file_and_the_environment(config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    config(TWO_RUNPODS)
    monkeypatch.setenv("BROKER_ENDPOINTS__RP_CPU__ENDPOINT_ID", "from-env")  # env spelling of rp-cpu
    monkeypatch.setenv("BROKER_ENDPOINTS__RP_CPU__ENGINES", "piper,csm")  # comma form for lists
    monkeypatch.setenv("BROKER_ENDPOINTS__MODAL_EU__KIND", "modal")
    monkeypatch.setenv("BROKER_ENDPOINTS__MODAL_EU__APP_NAME", "broker-eu")
    monkeypatch.setenv("RUNPOD_API_KEY", "rpa_secret_key_1")
    s = Settings()
    table = s.endpoint_configs()
    assert list(table)[:3] == ["rp-cpu", "rp-gpu", "modal_eu"]
    assert {"runpod", "modal", "replicate", "http"} <= set(table)  # the one-per-kind sections stay endpoints
    kind, cpu = table["rp-cpu"]
    assert kind == "runpod" and cpu.endpoint_id == "from-env" and cpu.engines == ["piper", "csm"]
    assert cpu.workers_max == 6 and cpu.api_key is not None  # RUNPOD_API_KEY fills every RunPod endpoint
    assert table["modal_eu"][0] == "modal" and table["modal_eu"][1].app_name == "broker-eu"
    assert "rpa_secret_key_1" not in repr(s) + json.dumps(s.redacted())


def test_comma_form_is_the_json_list_and_a_bad_value_is_one_line(config: Any, monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    monkeypatch.setenv("BROKER_MANAGER__PROVIDERS", "runpod,local")
    comma = Settings().manager.providers
    monkeypatch.setenv("BROKER_MANAGER__PROVIDERS", '["runpod", "local"]')
    assert comma == Settings().manager.providers == ["runpod", "local"]
    for bad in ("[runpod", "runpod;local", "runpod,,local"):
        monkeypatch.setenv("BROKER_MANAGER__PROVIDERS", bad)
        with pytest.raises(ConfigurationError, match=r"manager\.providers"):
            Settings()
    proc = run_cli("quote", "Hello.", env={"BROKER_MANAGER__PROVIDERS": "[runpod"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr  # one line
    assert "manager.providers" in proc.stderr and "'[runpod'" in proc.stderr
    # a name that is no endpoint is a mistake to report, not one to route around silently
    monkeypatch.setenv("BROKER_MANAGER__PROVIDERS", "runpd,local")
    typo = cli("quote", "Hello.")
    assert typo.exit_code == 2 and "'runpd'" in typo.output and "configured endpoints: local" in typo.output


def test_a_bad_endpoint_table_names_itself(config: Any) -> None:
    config('[endpoints.x]\nendpoint_id = "abc"\n')
    with pytest.raises(ConfigurationError, match=r"\[endpoints.x\] needs kind"):
        Settings()
    config('[endpoints.x]\nkind = "runpod"\nworkers_max = "lots"\n')
    with pytest.raises(ConfigurationError, match=r"\[endpoints.x\] workers_max"):
        Settings()


# -- configured means routed --------------------------------------------------------------------------
def test_with_nothing_configured_only_local_runs(config: Any) -> None:
    m = CloudGPUManager()
    assert m.providers == [] and m.fallback is not None and m.fallback.name == "local"
    reasons = {r.name: r.reason for r in m.endpoints if not r.routed}
    assert reasons == {"runpod": "missing endpoint id, API key", "modal": "missing app",
                       "replicate": "missing API token, deployment", "http": "missing url"}


def test_every_configured_endpoint_is_routed_without_manager_providers(config: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    config(TWO_RUNPODS + '\n[http]\nurl = "http://127.0.0.1:9"\nmax_concurrency = 2\n'
           '[replicate]\ndeployment = "me/broker"\nmax_instances = 5\n')
    monkeypatch.setenv("RUNPOD_API_KEY", "rpa_x")
    monkeypatch.setenv("REPLICATE_API_TOKEN", "r8_x")
    m = CloudGPUManager()
    assert names(m) == ["rp-cpu", "rp-gpu", "replicate", "http"] and m.fallback is not None
    by_name = {p.name: p for p in m.providers}
    assert {p.kind for p in m.providers} == {"runpod", "replicate", "http"}
    # max_concurrency comes from each kind's own scaling keys, or the explicit one
    assert (by_name["rp-cpu"].max_concurrency, by_name["rp-gpu"].max_concurrency) == (6, 3)
    assert (by_name["replicate"].max_concurrency, by_name["http"].max_concurrency) == (5, 2)
    assert {r.name: r.reason for r in m.endpoints if not r.routed} == {
        "runpod": "missing endpoint id", "modal": "missing app"}


def test_manager_providers_names_endpoints_or_kinds(config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    config(TWO_RUNPODS + '\n[http]\nurl = "http://127.0.0.1:9"\n')
    monkeypatch.setenv("RUNPOD_API_KEY", "rpa_x")
    monkeypatch.setenv("BROKER_MANAGER__PROVIDERS", "runpod,local")  # a kind: every configured RunPod endpoint
    m = CloudGPUManager()
    assert names(m) == ["rp-cpu", "rp-gpu"]
    excluded = {r.name: r.reason for r in m.endpoints if not r.routed}
    assert excluded["http"] == "excluded by manager.providers"
    monkeypatch.setenv("BROKER_MANAGER__PROVIDERS", "rp_gpu")  # the env spelling of rp-gpu
    assert names(CloudGPUManager()) == ["rp-gpu"]


def test_an_endpoint_without_the_engine_or_task_is_dropped_with_the_reason(config: Any,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    config(TWO_RUNPODS)
    monkeypatch.setenv("RUNPOD_API_KEY", "rpa_x")
    m = CloudGPUManager()
    piper = m.plan(SpeechRequest(text="Hello there."))  # no engine named: the default, piper
    assert [c.name for c in piper.ordered] == ["rp-cpu", "local"]
    assert dict((c.name, why) for c, why in piper.dropped) == {
        "rp-gpu": "does not have the 'piper' engine (the default engine)"}
    csm = m.plan(SpeechRequest(text="Hello there.", engine="csm"))
    assert csm.ordered[0].name == "rp-gpu"
    assert ("rp-cpu", "does not have the 'csm' engine") in [(c.name, why) for c, why in csm.dropped]
    render = m.plan(RenderRequest(text="Hi there.", engine="csm"))
    assert ("rp-gpu", "does not run render jobs") in [(c.name, why) for c, why in render.dropped]
    # prices key on the kind and hardware, reports on the endpoint's name
    cpu_quote = piper.ordered[0].quote
    assert (cpu_quote.provider, cpu_quote.hardware) == ("rp-cpu", "cpu") and cpu_quote.expected_usd > 0
    assert csm.ordered[0].quote.expected_usd > cpu_quote.expected_usd  # an A100 costs more than a CPU


def test_quote_lists_every_endpoint_and_why_the_others_are_not_routed(config: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    config(TWO_RUNPODS)
    monkeypatch.setenv("RUNPOD_API_KEY", "rpa_x")
    result = cli("quote", "Hello there.", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["provider"] for r in data["ranked"]] == ["rp-cpu", "local"]
    assert data["ranked"][0]["kind"] == "runpod" and data["ranked"][-1]["role"] == "fallback"
    why = {d["provider"]: (d["stage"], d["reason"]) for d in data["dropped"]}
    assert why["rp-gpu"] == ("plan", "does not have the 'piper' engine (the default engine)")
    assert why["runpod"] == ("config", "missing endpoint id")
    assert data["local"].startswith("fallback")
    table = cli("quote", "Hello there.")
    assert "local (fallback)" in table.stdout and "not routed runpod: missing endpoint id" in table.stdout


# -- local's place -----------------------------------------------------------------------------------------
def test_local_modes(config: Any) -> None:
    cloud = FakeProvider("cloud", usd_per_second=0.0001)
    request = SpeechRequest(text="Three words here.")

    def plan(deadline_s: float | None = None, **manager: Any) -> list[str]:
        s = Settings(manager=manager)
        m = CloudGPUManager([cloud], settings=s, catalog=fake_catalog(cloud))
        return [c.name for c in m.plan(request, deadline_s=deadline_s).ordered]

    assert plan() == ["cloud", "local"]  # fallback (default): last, whatever it costs
    assert plan(local="ranked") == ["local", "cloud"]  # free and quick: a tiny job stays local
    assert plan(local="off") == ["cloud"]
    assert plan(fallback_local=False) == ["cloud"]  # the deprecated switch still works: off unless listed
    # ranked, local is a candidate like any other: the deadline policy keeps the cheapest that makes it
    slow = FakeProvider("slow", usd_per_second=0.0, cold_start_s=30)  # free, but half a minute to wake
    s = Settings(manager={"local": "ranked", "policy": "deadline"}, local={"usd_per_hour": 1.0})
    m = CloudGPUManager([slow], settings=s, catalog=fake_catalog(slow))
    within = m.plan(request, deadline_s=5.0)
    assert [c.name for c in within.ordered] == ["local"]
    assert [c.name for c, why in within.dropped if "misses the 5 s deadline" in why] == ["slow"]
    assert [c.name for c in m.plan(request, deadline_s=120.0).ordered] == ["slow", "local"]  # both make it


def test_ranked_local_competes_at_its_hourly_price(config: Any) -> None:
    cheap = FakeProvider("cheap", usd_per_second=0.000001)
    s = Settings(manager={"local": "ranked"}, local={"usd_per_hour": 36.0})  # $0.01 a second
    m = CloudGPUManager([cheap], settings=s, catalog=fake_catalog(cheap))
    ranked = m.plan(SpeechRequest(text="A few words to say.")).ordered
    assert [c.name for c in ranked] == ["cheap", "local"]
    assert ranked[1].quote.expected_usd > ranked[0].quote.expected_usd > 0
    result = cli("quote", "Hi.", "--json")  # the file's settings: local is the fallback and says so
    assert json.loads(result.stdout)["local"].startswith("fallback")


def test_quote_labels_ranked_local(config: Any) -> None:
    config('[manager]\nlocal = "ranked"\n')
    result = cli("quote", "Hi there.")
    assert result.exit_code == 0, result.output
    assert "local (ranked)" in result.stdout and "ranked: competes" in result.stdout
    config('[manager]\nlocal = "off"\n')
    data = json.loads(cli("quote", "Hi there.", "--json").stdout)
    assert data["ranked"] == [] and data["local"].startswith("off")


# -- words ---------------------------------------------------------------------------------------------------
def test_providers_routed_column_says_why_not(config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    config(TWO_RUNPODS + '\n[endpoints.rp-new]\nkind = "runpod"\n[endpoints.odd]\nkind = "nosuchkind"\n'
           '[http]\nurl = "http://127.0.0.1:9"\n[manager]\nproviders = ["rp-cpu", "rp-new", "odd"]\nlocal = "off"\n')
    monkeypatch.setenv("RUNPOD_API_KEY", "rpa_x")
    result = cli("providers", "--json", "--no-probe")
    assert result.exit_code == 0, result.output
    rows = {r["provider"]: r for r in json.loads(result.stdout)}
    assert rows["rp-cpu"]["routed"] is True and rows["rp-cpu"]["kind"] == "runpod"
    assert rows["rp-gpu"]["reason"] == "excluded by manager.providers" and rows["rp-gpu"]["configured"]
    assert rows["rp-gpu"]["region"] == "eu"
    assert rows["rp-new"]["reason"] == "missing endpoint id" and not rows["rp-new"]["routed"]
    assert "[endpoints.rp-new] endpoint_id" in rows["rp-new"]["detail"]
    assert rows["odd"]["reason"] == "unknown kind"
    assert rows["http"]["reason"] == "excluded by manager.providers"
    assert rows["replicate"]["reason"] == "missing API token, deployment"
    assert rows["local"]["reason"] == "off" and rows["local"]["state"] == "off"
    table = cli("providers", "--no-probe").stdout
    assert "no: missing endpoint id" in table and "no: excluded by manager.providers" in table
    assert "[endpoints.rp-new] endpoint_id" in table.replace("\n", " ") or "[endpoints.rp-new]" in table


def test_provider_option_names_what_is_wrong(config: Any, tmp_path: Path) -> None:
    config(TWO_RUNPODS)
    out = tmp_path / "x.wav"
    bogus = cli("speak", "Hello.", "--provider", "bogus", "-o", str(out))
    assert bogus.exit_code == 2 and "'bogus'" in bogus.output
    assert "configured endpoints: local" in bogus.output and "rp-cpu (missing API key)" in bogus.output
    runpod = cli("speak", "Hello.", "--provider", "runpod", "-o", str(out))
    assert runpod.exit_code == 2
    text = " ".join(runpod.output.split())
    assert "[runpod] endpoint_id" in text and "RUNPOD_API_KEY" in text  # brackets survive rich
    assert "no configured provider can run" not in text and not out.exists()


# -- bench, per endpoint ---------------------------------------------------------------------------------
async def test_bench_measures_endpoints_of_one_kind_apart(config: Any) -> None:
    from broker.bench.model import keep_warm
    from broker.bench.run import BenchOptions, abench
    from broker.money.ledger import Ledger

    one = FakeProvider("gpu-a", kind="fakegpu", latency_s=0.01, usd_per_second=0.002, hardware="fast-gpu")
    two = FakeProvider("gpu-b", kind="fakegpu", latency_s=0.05, usd_per_second=0.002, hardware="fast-gpu")
    local = FakeProvider("local", latency_s=0.02, hardware="cpu")
    ledger = Ledger(":memory:")
    options = BenchOptions(estimate=False, live=True, providers=[], words=(500,), render_seconds=(),
                           warm_runs=1, volume=100)
    result = await abench(options, providers=[one, two, local], catalog=fake_catalog(one), ledger=ledger)
    rows = {r.provider: r for r in result.rows}
    assert set(rows) == {"gpu-a", "gpu-b", "local"}  # one row per endpoint, not per kind
    assert rows["gpu-a"].usd and rows["gpu-b"].usd  # both priced by their kind's row
    assert {m.provider for m in result.monthly} == {"gpu-a", "gpu-b", "local"}
    assert all(m.usd is not None for m in result.monthly)
    assert {a["provider"] for a in ledger.attempts()} == {"gpu-a", "gpu-b", "local"}
    # keep-warm settings come from the endpoint's own table
    config(TWO_RUNPODS.replace("workers_max = 6", "workers_max = 6\nworkers_min = 2\nidle_timeout_s = 30"))
    assert keep_warm(Settings(), "rp-cpu") == (2, 30.0) and keep_warm(Settings(), "rp-gpu") == (0, 5.0)


def test_a_plugin_kind_whose_sdk_is_missing_is_not_installed(config: Any, tmp_path: Path) -> None:
    """A real plugin, found through the broker.providers entry-point group, whose module needs an absent SDK."""
    site = tmp_path / "site"
    info = site / "broker_sdkless-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broker-sdkless\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[broker.providers]\nsdkless = broker_sdkless:SDKLessProvider\n")
    (site / "broker_sdkless.py").write_text("import some_cloud_sdk_nobody_installed  # noqa\n")
    env = {"PYTHONPATH": f"{site}:{Path(__file__).resolve().parent.parent}"}
    proc = run_cli("providers", "--json", "--no-probe", env=env)
    assert proc.returncode == 0, proc.stderr
    row = next(r for r in json.loads(proc.stdout) if r["provider"] == "sdkless")
    assert (row["kind"], row["routed"], row["reason"], row["installed"]) == ("sdkless", False, "not installed", False)
    assert "some_cloud_sdk_nobody_installed" in row["detail"] and "pip install" in row["detail"]
    speak = run_cli("speak", "Hi.", "--provider", "sdkless", "-o", str(tmp_path / "x.wav"), env=env)
    assert speak.returncode == 2 and "some_cloud_sdk_nobody_installed" in speak.stderr
