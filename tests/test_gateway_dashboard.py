"""The dashboard in real headless Chromium (Debian's package, driven by Playwright): jobs, providers, the spend
chart (checked on a screenshot: its bars are drawn) and a speech job submitted from the form and played."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image

from broker.testing.asgi_server import LoopbackServer
from broker.testing.fake import FakeProvider
from tests.gateway_support import SPEECH, fake_manager, gateway_app, wait_state

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_dashboard_shows_jobs_chart_and_plays_a_job(tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
    from playwright.sync_api import sync_playwright

    manager = fake_manager(tmp_path, FakeProvider("fast", usd_per_second=0.01, latency_s=0.01))
    with LoopbackServer(gateway_app(tmp_path, manager)) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            for i in range(3):
                job = c.post("/v1/jobs", json={**SPEECH, "input": {"text": f"Warm-up job {i}. Hello."}}).json()
                wait_state(c, job["id"])
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(srv.url + "/")
                page.wait_for_selector("body[data-loaded='1']", timeout=20_000)
                assert page.locator("#jobs tbody tr").count() == 3
                assert "succeeded" in page.locator("#jobs tbody").inner_text()
                assert "fast" in page.locator("#providers tbody").inner_text()
                assert page.locator("#summary").inner_text().startswith("$")
                # the chart has data: its bars are the accent blue, on a white canvas
                shot = Image.open(io.BytesIO(page.locator("#chart").screenshot())).convert("RGB")
                blue = sum(1 for r, g, b in shot.getdata() if b > 200 and r < 90 and 90 < g < 140)
                assert blue > 500, f"only {blue} bar pixels in the chart"
                page.fill("#text", "Submitted from the dashboard.")
                page.click("#speak button[type=submit]")
                page.wait_for_function("document.getElementById('player').dataset.job", timeout=30_000)
                job_id = page.eval_on_selector("#player", "el => el.dataset.job")
                assert page.locator("#status").inner_text() == "done"
                assert page.eval_on_selector("#player", "el => el.src").startswith("blob:")
            finally:
                browser.close()
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded"
