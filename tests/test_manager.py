"""CloudGPUManager behaviours, one at a time, over scripted fake providers (and the real local one)."""

from __future__ import annotations

import asyncio
import time

import pytest

from broker.errors import AllProvidersFailed, InvalidRequest, OutputNotKept
from broker.media import Audio, Video
from broker.providers.base import JobState
from broker.routing.manager import CloudGPUManager, ManagedJob
from broker.routing.policy import fastest
from broker.settings import Settings
from broker.testing.fake import FakeProvider, fake_catalog
from broker.types import RenderRequest, SpeechRequest

TEXT = "a dozen words or so that a provider should speak in a few seconds"


def settings(**manager: object) -> Settings:
    s = Settings()
    m = s.manager
    m.fallback_local = False
    m.backoff_initial_s = 0.01
    m.backoff_max_s = 0.05
    m.backoff_jitter_s = 0.005
    m.breaker_ejection_s = 0.2
    m.deadline_s = 10.0
    for k, v in manager.items():
        setattr(m, k, v)
    return s


def manager(*providers: FakeProvider, **manager_settings: object) -> CloudGPUManager:
    return CloudGPUManager(list(providers), settings=settings(**manager_settings), catalog=fake_catalog(*providers))


def outcomes(out_or_mgr: Audio | Video | CloudGPUManager) -> list[tuple[str, str, str | None]]:
    report = out_or_mgr.last_report if isinstance(out_or_mgr, CloudGPUManager) else out_or_mgr.report
    assert report is not None
    return [(a.provider, a.outcome, a.error_class) for a in report.attempts]


async def test_cheapest_healthy_provider_is_used_and_reported() -> None:
    dear, cheap = FakeProvider("dear", usd_per_second=0.01), FakeProvider("cheap", usd_per_second=0.001)
    m = manager(dear, cheap)
    out = await m.arun(SpeechRequest(text=TEXT))
    assert isinstance(out, Audio) and out.report is not None
    assert out.report.provider == "cheap" and outcomes(out) == [("cheap", "succeeded", None)]
    assert m.last_report is out.report and dear.submits == 0
    (row,) = m.ledger.attempts()
    assert row["provider"] == "cheap" and row["status"] == "succeeded" and row["provider_job_id"]
    assert row["cost_usd"] == pytest.approx(out.report.cost_usd)


async def test_the_output_sink_runs_before_the_attempt_is_settled() -> None:
    fast = FakeProvider("fast", usd_per_second=0.001)
    m = manager(fast)
    seen: list[tuple[Audio | Video, list[str]]] = []

    async def keep(out: Audio | Video) -> None:
        seen.append((out, [r["status"] for r in m.ledger.attempts(job_id="j1")]))

    out = await m.arun(SpeechRequest(text=TEXT), job_id="j1", on_output=keep)
    assert len(seen) == 1 and seen[0][0] is out
    assert seen[0][1] == ["running"]  # open (write-ahead) while the output is kept; settled after
    assert [r["status"] for r in m.ledger.attempts(job_id="j1")] == ["succeeded"]


async def test_a_failing_output_sink_ends_the_job_with_no_retry_or_failover() -> None:
    cheap, dear = FakeProvider("cheap", usd_per_second=0.001), FakeProvider("dear", usd_per_second=0.01)
    m = manager(cheap, dear)

    async def keep(out: Audio | Video) -> None:
        raise OSError("disk full")

    with pytest.raises(OutputNotKept, match="disk full") as caught:
        await m.arun(SpeechRequest(text=TEXT), job_id="j2", on_output=keep)
    assert "internal error" not in caught.value.message  # a typed failure, not a bug report
    assert cheap.submits == 1 and dear.submits == 0  # the work was done: nobody else is paid to redo it
    assert [(r["provider"], r["status"]) for r in m.ledger.attempts(job_id="j2")] == [("cheap", "succeeded")]
    assert outcomes(m) == [("cheap", "succeeded", None)]


async def test_a_policy_value_changes_the_choice() -> None:
    slow_cheap = FakeProvider("slow", usd_per_second=0.001, cold_start_s=30)  # quoted with its cold start
    fast_dear = FakeProvider("fast", usd_per_second=0.01)
    out = await manager(slow_cheap, fast_dear).arun(SpeechRequest(text=TEXT), policy=fastest)
    assert out.report.provider == "fast"  # type: ignore[union-attr]


async def test_rate_limit_waits_for_retry_after_then_retries_the_same_provider() -> None:
    p = FakeProvider("p", script=["rate_limited", "ok"], retry_after_s=0.3)
    t0 = time.monotonic()
    out = await manager(p).arun(SpeechRequest(text=TEXT))
    assert time.monotonic() - t0 >= 0.3  # Retry-After honoured, not burnt in milliseconds
    assert outcomes(out) == [("p", "failed", "RateLimited"), ("p", "succeeded", None)]


async def test_long_retry_after_fails_over_at_once_when_another_provider_is_left() -> None:
    limited = FakeProvider("limited", script=["rate_limited"], retry_after_s=30, usd_per_second=0.001)
    other = FakeProvider("other", usd_per_second=0.01)
    m = manager(limited, other)
    t0 = time.monotonic()
    out = await m.arun(SpeechRequest(text=TEXT))
    assert time.monotonic() - t0 < 5
    assert outcomes(out) == [("limited", "failed", "RateLimited"), ("other", "succeeded", None)]
    # the next job skips the provider that asked to be left alone
    await m.arun(SpeechRequest(text=TEXT))
    assert limited.submits == 1
    assert "rate limited" in dict((c.name, why) for c, why in m.plan(SpeechRequest(text=TEXT)).dropped)["limited"]


async def test_5xx_and_transport_errors_back_off_and_retry() -> None:
    p = FakeProvider("p", script=["unavailable", "transport", "ok"])
    out = await manager(p, attempts_per_provider=3).arun(SpeechRequest(text=TEXT))
    assert outcomes(out) == [("p", "failed", "ProviderUnavailable"), ("p", "failed", "ProviderUnavailable"),
                             ("p", "succeeded", None)]


async def test_invalid_request_is_never_retried_nor_sent_elsewhere() -> None:
    strict, other = FakeProvider("strict", script=["invalid"]), FakeProvider("other", usd_per_second=1)
    m = manager(strict, other)
    with pytest.raises(InvalidRequest):
        await m.arun(SpeechRequest(text=TEXT))
    assert strict.submits == 1 and other.submits == 0


async def test_bad_input_stops_before_any_provider() -> None:
    p = FakeProvider("p")
    with pytest.raises(InvalidRequest, match="text"):
        await manager(p).agenerate_speech("   ")
    with pytest.raises(InvalidRequest, match="max_length_ms"):
        await manager(p).agenerate_speech("hello", max_length_ms=1e12)
    assert p.submits == 0


async def test_stuck_queue_is_cancelled_and_the_next_provider_tried() -> None:
    stuck = FakeProvider("stuck", script=["stuck"], queue_timeout_s=0.1, usd_per_second=0.001)
    ok = FakeProvider("ok", usd_per_second=0.01)
    out = await manager(stuck, ok).arun(SpeechRequest(text=TEXT))
    assert outcomes(out) == [("stuck", "failed", "ProviderTimeout"), ("ok", "succeeded", None)]
    assert "queued" in (out.report.attempts[0].message or "")  # type: ignore[union-attr]
    (job,) = stuck.jobs
    assert job.cancel_called and job.state == JobState.CANCELLED


async def test_bad_output_fails_over_and_is_never_returned() -> None:
    for behaviour in ("silent", "truncated", "nan"):
        bad = FakeProvider("bad", script=[behaviour], usd_per_second=0.001)
        good = FakeProvider("good", usd_per_second=1)
        out = await manager(bad, good).arun(SpeechRequest(text=TEXT))
        assert outcomes(out) == [("bad", "failed", "BadOutput"), ("good", "succeeded", None)], behaviour


async def test_lost_and_failed_jobs_fail_over_without_reentering() -> None:
    a = FakeProvider("a", script=["lost"], usd_per_second=0.001)
    b = FakeProvider("b", script=["failed"], usd_per_second=0.002)
    c = FakeProvider("c", usd_per_second=0.003)
    out = await manager(a, b, c).arun(SpeechRequest(text=TEXT))
    assert outcomes(out) == [("a", "lost", "JobLost"), ("b", "failed", "JobFailed"), ("c", "succeeded", None)]
    assert (a.submits, b.submits, c.submits) == (1, 1, 1)


async def test_every_provider_failing_reports_every_attempt() -> None:
    a, b = FakeProvider("a", script=["failed"]), FakeProvider("b", script=["lost"])
    with pytest.raises(AllProvidersFailed) as err:
        await manager(a, b).arun(SpeechRequest(text=TEXT))
    assert [(x.provider, x.error_class) for x in err.value.attempts] == [("a", "JobFailed"), ("b", "JobLost")]
    assert "a: failed JobFailed" in str(err.value)


async def test_circuit_opens_after_three_failures_and_later_jobs_skip_it() -> None:
    flaky = FakeProvider("flaky", script=["failed"], usd_per_second=0.001)
    steady = FakeProvider("steady", usd_per_second=0.01)
    m = manager(flaky, steady, breaker_ejection_s=60)
    for _ in range(3):
        await m.arun(SpeechRequest(text=TEXT))
    assert flaky.submits == 3
    out = await m.arun(SpeechRequest(text=TEXT))
    assert flaky.submits == 3 and outcomes(out) == [("steady", "succeeded", None)]
    info = (await m.health()).info
    assert info["flaky"]["state"] == "open" and "JobFailed" in info["flaky"]["last_error"]


async def test_half_open_probe_keeps_a_still_unhealthy_provider_out() -> None:
    sick = FakeProvider("sick", script=["failed", "failed", "failed", "ok"], healthy=False, usd_per_second=0.001)
    fine = FakeProvider("fine", usd_per_second=0.01)
    m = manager(sick, fine, breaker_ejection_s=0.05)
    for _ in range(3):
        await m.arun(SpeechRequest(text=TEXT))
    await asyncio.sleep(0.06)
    out = await m.arun(SpeechRequest(text=TEXT))
    assert sick.submits == 3 and sick.health_probes >= 1  # the probe said no: no job was risked
    assert out.report.provider == "fine"  # type: ignore[union-attr]


async def test_all_cloud_open_falls_to_local_at_once() -> None:
    cloud = FakeProvider("cloud", script=["failed"], usd_per_second=0.001)
    local = FakeProvider("local", usd_per_second=0.0)
    s = settings(breaker_ejection_s=60)
    s.manager.fallback_local = True
    m = CloudGPUManager([cloud, local], settings=s, catalog=fake_catalog(cloud, local))
    assert m.fallback is local and local not in m.providers
    for _ in range(3):
        out = await m.arun(SpeechRequest(text=TEXT))
        assert out.report.provider == "local"  # type: ignore[union-attr]
    t0 = time.monotonic()
    out = await m.arun(SpeechRequest(text=TEXT))
    assert time.monotonic() - t0 < 1.0 and outcomes(out) == [("local", "succeeded", None)]
    assert cloud.submits == 3


async def test_local_is_last_even_though_it_is_free() -> None:
    cloud = FakeProvider("cloud", usd_per_second=0.01)
    local = FakeProvider("local")
    s = settings()
    s.manager.fallback_local = True
    m = CloudGPUManager([local, cloud], settings=s, catalog=fake_catalog(cloud, local))
    assert [c.name for c in m.plan(SpeechRequest(text=TEXT)).ordered] == ["cloud", "local"]


async def test_with_everything_open_and_no_local_the_job_waits_for_a_half_open() -> None:
    p = FakeProvider("p", script=["failed", "failed", "failed", "ok"])
    m = manager(p, breaker_ejection_s=0.3, probe_on_half_open=False)
    for _ in range(3):
        with pytest.raises(AllProvidersFailed):
            await m.arun(SpeechRequest(text=TEXT))
    t0 = time.monotonic()
    out = await m.arun(SpeechRequest(text=TEXT))  # the circuit is open: wait, do not fail at once
    assert time.monotonic() - t0 >= 0.2 and out.report.provider == "p"  # type: ignore[union-attr]
    # ...but never past the deadline
    p.set_script(["failed"])
    m2 = manager(p, breaker_ejection_s=60)
    for _ in range(3):
        with pytest.raises(AllProvidersFailed):
            await m2.arun(SpeechRequest(text=TEXT))
    t0 = time.monotonic()
    with pytest.raises(AllProvidersFailed, match="no provider can take this job"):
        await m2.arun(SpeechRequest(text=TEXT), deadline_s=1.0)
    assert time.monotonic() - t0 < 0.5  # the half-open is after the deadline: no point waiting


async def test_a_hanging_job_is_cancelled_at_the_deadline() -> None:
    hang = FakeProvider("hang", script=["hang"])
    with pytest.raises(AllProvidersFailed, match="deadline"):
        await manager(hang).arun(SpeechRequest(text=TEXT), deadline_s=0.3)
    assert hang.jobs[0].cancel_called and hang.left_running() == []


async def test_a_job_running_far_past_its_quote_fails_over() -> None:
    hang = FakeProvider("hang", script=["hang"], usd_per_second=0.001)
    ok = FakeProvider("ok", usd_per_second=0.01)
    out = await manager(hang, ok, min_run_timeout_s=0.2, run_timeout_factor=1.0).arun(SpeechRequest(text=TEXT))
    assert outcomes(out) == [("hang", "failed", "ProviderTimeout"), ("ok", "succeeded", None)]
    assert hang.left_running() == []


async def test_hedge_starts_the_next_provider_and_cancels_the_loser() -> None:
    slow = FakeProvider("slow", script=["stuck"], usd_per_second=0.001, queue_timeout_s=30)
    quick = FakeProvider("quick", usd_per_second=0.01, latency_s=0.01)
    m = manager(slow, quick, hedge_after_s=0.05)
    out = await m.arun(SpeechRequest(text=TEXT))
    assert out.report.provider == "quick"  # type: ignore[union-attr]
    assert sorted(outcomes(out)) == [("quick", "succeeded", None), ("slow", "cancelled", None)]
    assert slow.jobs[0].cancel_called and slow.left_running() == []
    assert len(m.ledger.attempts()) == 2


async def test_hedge_is_skipped_when_the_job_already_runs_or_the_cap_forbids() -> None:
    running = FakeProvider("running", latency_s=0.2, usd_per_second=0.001)
    other = FakeProvider("other", usd_per_second=0.01)
    out = await manager(running, other, hedge_after_s=0.05).arun(SpeechRequest(text=TEXT))
    assert outcomes(out) == [("running", "succeeded", None)] and other.submits == 0
    queued = FakeProvider("queued", queue_s=0.3, usd_per_second=0.001)  # still queued at hedge time
    dear = FakeProvider("dear", usd_per_second=10.0)
    out = await manager(queued, dear, hedge_after_s=0.05, hedge_max_usd=0.01).arun(SpeechRequest(text=TEXT))
    assert outcomes(out) == [("queued", "succeeded", None)]
    assert dear.submits == 0  # a hedge there would break the cost cap


async def test_cancelling_the_managed_job_cancels_the_provider_job() -> None:
    stuck = FakeProvider("stuck", script=["hang"])
    m = manager(stuck)
    job = await m.submit(SpeechRequest(text=TEXT))
    await asyncio.sleep(0.05)
    assert job.state == JobState.RUNNING
    await job.cancel()
    assert job.state == JobState.CANCELLED and stuck.jobs[0].cancel_called
    assert isinstance(job, ManagedJob) and [a.outcome for a in job.report.attempts] == ["cancelled"]
    (row,) = m.ledger.attempts()
    assert row["status"] == "cancelled"


async def test_streaming_fails_over_before_the_first_chunk() -> None:
    broken = FakeProvider("broken", script=["failed"], usd_per_second=0.001)
    good = FakeProvider("good", usd_per_second=0.01)
    m = manager(broken, good)
    chunks = [c async for c in m.astream_speech(TEXT)]
    assert len(chunks) == 4 and chunks[-1].is_end and not any(c.final for c in chunks[:-1])
    assert m.last_report is not None and m.last_report.provider == "good"
    assert [(a.provider, a.outcome) for a in m.last_report.attempts] == [("broken", "failed"), ("good", "succeeded")]


async def test_render_goes_through_the_same_path() -> None:
    p = FakeProvider("p", usd_per_second=0.001)
    video = await manager(p).arender(text="a short line to speak and render")
    assert isinstance(video, Video) and video.report is not None and video.report.frames == video.frames


async def test_a_provider_that_prices_itself_is_asked_for_its_quote() -> None:
    class Priced(FakeProvider):
        def quote(self, request: object) -> object:
            from broker.types import Quote

            return Quote(provider=self.name, hardware="own", expected_seconds=1, expected_usd=0.0001)

    own, catalogued = Priced("own"), FakeProvider("catalogued", usd_per_second=0.01)
    plan = manager(own, catalogued).plan(SpeechRequest(text=TEXT))
    assert [c.name for c in plan.ordered] == ["own", "catalogued"] and plan.ordered[0].quote.hardware == "own"


def test_sync_drop_in_returns_a_tensor_or_audio() -> None:
    p = FakeProvider("p")
    m = manager(p)
    tensor = m.generate_speech(TEXT, 0)
    assert tensor.ndim == 1 and tensor.dtype.is_floating_point  # torch is installed here
    audio = m.generate_speech(TEXT, 0, return_tensor=False, deadline_s=5.0)
    assert isinstance(audio, Audio) and audio.report is m.last_report
    out = m.run_request(RenderRequest(audio=audio))
    assert isinstance(out, Video)


@pytest.mark.usefixtures("piper_available")
async def test_real_local_provider_is_the_final_fallback() -> None:
    down = FakeProvider("down", script=["unavailable"], usd_per_second=0.001)
    s = settings(attempts_per_provider=1)
    s.manager.fallback_local = True
    m = CloudGPUManager([down], settings=s, catalog=fake_catalog(down))
    assert m.fallback is not None and m.fallback.name == "local"
    out = await m.arun(SpeechRequest(text="Hello from the local fallback."))
    assert isinstance(out, Audio) and out.duration_s > 0.5
    assert outcomes(out) == [("down", "failed", "ProviderUnavailable"), ("local", "succeeded", None)]


@pytest.mark.usefixtures("piper_available")
async def test_streaming_from_the_real_local_fallback() -> None:
    s = settings()
    s.manager.fallback_local = True
    m = CloudGPUManager([], settings=s)
    chunks = [c async for c in m.astream_speech("First sentence here. And a second one follows it.")]
    assert len(chunks) >= 2 and chunks[-1].final and not chunks[0].final
    assert m.last_report is not None and m.last_report.provider == "local"
    assert [a.outcome for a in m.last_report.attempts] == ["succeeded"]
    # a consumer that stops early leaves nothing running and records a cancellation
    agen = m.astream_speech("One. Two. Three. Four. Five. Six.")
    first = await agen.__anext__()
    assert first.index == 0
    await agen.aclose()
    assert m.last_report is not None and m.last_report.attempts[-1].outcome == "cancelled"
