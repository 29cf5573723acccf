"""The price catalog and quotes: data with sources, billing rules, the quote formula, overrides."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from broker.errors import ConfigurationError
from broker.money import pricing
from broker.money.pricing import Catalog, PriceRow, cost_for, parse_prices, quote_for, speech_audio_seconds
from broker.settings import Settings
from broker.testing.fake import FakeProvider
from broker.types import RenderRequest, SpeechRequest


@pytest.fixture()
def catalog() -> Catalog:
    return Catalog.packaged()


def test_every_row_has_a_source_and_date(catalog: Catalog) -> None:
    rows = catalog.prices()
    assert {r.provider for r in rows} >= {"runpod", "modal", "replicate", "http", "local"}
    for r in rows:
        assert r.checked, r
        assert r.basis in ("published", "estimate", "config"), r
        if r.basis != "config":
            assert r.source.startswith("https://"), r
    for p in catalog.profiles():
        assert p.basis in ("measured", "published", "estimate") and p.source and p.checked, p


def test_gpu_and_cpu_tiers_are_priced(catalog: Catalog) -> None:
    for provider in ("runpod", "modal", "replicate"):
        assert catalog.price(provider, "cpu") is not None, provider
    # the published per-second list prices we cite
    assert catalog.price("runpod", "A100-80GB").usd_per_second == pytest.approx(0.00076)  # type: ignore[union-attr]
    assert catalog.price("replicate", "gpu-l40s").usd_per_second == pytest.approx(0.000975)  # type: ignore[union-attr]
    assert catalog.price("modal", "H100").usd_per_second == pytest.approx(0.001097)  # type: ignore[union-attr]
    # aliases and case do not matter
    assert catalog.price("RunPod", "l40") is catalog.price("runpod", "L40S")


def test_billing_rounds_up_and_applies_the_minimum() -> None:
    row = PriceRow("x", ("gpu",), "gpu", usd_per_second=0.001, min_billed_s=10, increment_s=1)
    assert row.billed_seconds(2.3) == 10  # minimum
    assert row.billed_seconds(12.1) == 13  # rounded up to the second
    assert row.billed_seconds(0) == 0  # nothing run, nothing billed
    assert row.cost(12.1) == pytest.approx(0.013)


def test_cost_for_uses_the_catalog_and_is_unknown_without_a_row() -> None:
    assert cost_for("runpod", "A100", 2.3) == pytest.approx(3 * 0.00076)  # RunPod rounds up to whole seconds
    assert cost_for("nobody", "nothing", 100) is None  # unknown is not free


def test_quote_is_queue_plus_cold_start_times_p_plus_run(catalog: Catalog) -> None:
    request = SpeechRequest(text=" ".join(["word"] * 100))  # ~40 s of speech
    audio_s = speech_audio_seconds(request)
    row = catalog.price("runpod", "A100-80GB")
    assert row is not None
    q = catalog.quote("runpod", "A100-80GB", request, p_cold=0.5, queue_s=3.0)
    run_s = audio_s * catalog.profile("piper", "A100").value  # type: ignore[union-attr]
    assert q.breakdown["run"] == pytest.approx(run_s)
    assert q.expected_seconds == pytest.approx(3.0 + 0.5 * row.cold_start_s + run_s)
    billable = run_s + 0.5 * row.cold_start_s + row.idle_s  # RunPod bills start-up and the idle tail
    assert q.expected_usd == pytest.approx(row.cost(billable))


def test_cold_start_assumed_when_unknown_and_never_for_always_on(catalog: Catalog) -> None:
    request = SpeechRequest(text="hello there")
    assert catalog.quote("modal", "cpu", request).breakdown["p_cold"] == 1.0
    assert catalog.quote("local", "cpu", request).breakdown["p_cold"] == 0.0


def test_cheap_cpu_beats_gpus_on_cost_for_piper(catalog: Catalog) -> None:
    """The point of CPU rows: non-urgent Piper speech costs less on a CPU container than on any GPU."""
    request = SpeechRequest(text=" ".join(["word"] * 300))
    for provider in ("runpod", "modal"):
        cpu = catalog.quote(provider, "cpu", request).expected_usd
        gpus = [catalog.quote(r.provider, r.hardware[0], request).expected_usd
                for r in catalog.prices() if r.provider == provider and not r.hardware[0].startswith("cpu")]
        assert cpu < min(gpus), provider


def test_render_quote_counts_frames_and_speech(catalog: Catalog) -> None:
    req = RenderRequest(text=" ".join(["word"] * 25), fps=25)
    q = catalog.quote("local", "cpu", req)
    speech, _ = catalog.run_seconds(SpeechRequest(text=req.text), "cpu-2")  # type: ignore[arg-type]
    frames = math.ceil(10.0 * 25)
    render = catalog.profile("render", "cpu-2")
    assert render is not None
    assert q.breakdown["run"] == pytest.approx(speech + frames / render.value)


def test_unknown_provider_is_quoted_unpriced(catalog: Catalog) -> None:
    q = catalog.quote("plugin", "tpu", SpeechRequest(text="hi there"))
    assert q.expected_usd == 0.0 and q.breakdown.get("unpriced") == 1.0


def test_prices_path_overrides_and_http_hourly_from_settings(tmp_path: Path) -> None:
    override = tmp_path / "prices.csv"
    override.write_text("provider,hardware,usd_per_second,cold_start_s\nrunpod,A100-80GB,0.002,30\n")
    settings = Settings(prices_path=str(override))
    settings.http.hardware = "A100-80GB"
    settings.http.usd_per_hour = 1.44
    cat = Catalog.from_settings(settings)
    assert cat.price("runpod", "A100-80GB").usd_per_second == 0.002  # type: ignore[union-attr]
    assert cat.price("runpod", "A100-80GB").cold_start_s == 30  # type: ignore[union-attr]
    assert cat.price("runpod", "H100").usd_per_second == pytest.approx(0.00116)  # type: ignore[union-attr]  # kept
    http = cat.price("http", "A100-80GB")
    assert http is not None and http.usd_per_second == pytest.approx(1.44 / 3600) and http.basis == "config"
    assert cat.cost("http", "A100-80GB", 100) == pytest.approx(0.04)


def test_newer_schema_and_bad_rows_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="schema_version=2"):
        parse_prices("# prices, schema_version=2\nprovider,hardware,usd_per_second\nx,y,1\n")
    with pytest.raises(ConfigurationError, match="line 2"):
        parse_prices("provider,hardware,usd_per_second\nx,y,-1\n")


def test_quote_for_contract_uses_provider_name_and_hardware() -> None:
    fake = FakeProvider("runpod", hardware="A100-80GB")
    pricing.set_default_catalog(Catalog.packaged())
    try:
        q = quote_for(fake, SpeechRequest(text="a few words here"))
        assert q.provider == "runpod" and q.hardware == "A100-80GB" and q.expected_usd > 0
    finally:
        pricing.set_default_catalog(None)


def test_the_example_override_file_parses() -> None:
    root = Path(__file__).resolve().parent.parent
    rows = parse_prices((root / "config" / "prices.example.csv").read_text(), "prices.example.csv")
    assert {r.provider for r in rows} == {"runpod", "modal"}
