"""The requester page and the operator dashboard in a real headless Chromium (Debian's
`chromium`, driven by Playwright with its executable: `make browser` installs it).

A real stack (nats-server, PostgreSQL, an orchestrator, tiny-model workers) behind the
real web app served by uvicorn. Screenshots go to the test's temporary folder, or to
$IMAGEBUS_TEST_SCREENSHOTS (`IMAGEBUS_TEST_SCREENSHOTS=docs/screenshots` refreshes the README's).
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import Stack
from .webstack import serve_web

playwright_api = pytest.importorskip("playwright.async_api")

CHROMIUM = os.environ.get("IMAGEBUS_TEST_CHROMIUM") or next(
    filter(None, (shutil.which(name) for name in ("chromium", "chromium-browser"))), None
)
ADMIN_TOKEN = "admin-secret-for-tests"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="no chromium on this machine: `make browser` installs it"
    ),
]


@dataclass
class Web:
    url: str
    stack: Stack
    shots: Path


@pytest.fixture
async def web(stack: Stack, tmp_path: Path) -> AsyncIterator[Web]:
    await stack.start_orchestrator()
    for name in ("w-page-a", "w-page-b"):
        await stack.start_worker(name, slots=2)
    shots = Path(os.environ.get("IMAGEBUS_TEST_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    async with serve_web(stack.nats_url, admin_token=ADMIN_TOKEN, rate_per_minute=0.0) as server:
        yield Web(server.url, stack, shots)


@pytest.fixture
async def page(web: Web) -> AsyncIterator[playwright_api.Page]:
    async with playwright_api.async_playwright() as driver:
        browser = await driver.chromium.launch(executable_path=CHROMIUM)
        context = await browser.new_context(
            viewport={"width": 1280, "height": 860}, accept_downloads=True
        )
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        yield page
        await browser.close()
        assert not errors, f"the page's scripts failed: {errors}"


def save_screenshot(png: bytes, path: Path) -> None:
    """A small PNG for the docs: 256 colours are plenty for a page of flat colours."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(256)
    image.save(path, optimize=True)


# Records every value each progress bar takes, so the test sees them move.
WATCH_PROGRESS = """() => {
  window.progressSeen = {};
  new MutationObserver((changes) => {
    for (const change of changes) {
      const bar = change.target;
      const tile = bar.closest('[data-index]');
      if (!tile) continue;
      const value = Number(bar.getAttribute('aria-valuenow'));
      (window.progressSeen[tile.dataset.index] ||= []).push(value);
    }
  }).observe(document.body, {subtree: true, attributes: true, attributeFilter: ['aria-valuenow']});
}"""


async def send_traffic(page: playwright_api.Page, url: str, jobs: int) -> None:
    """Jobs sent from another tab of the same browser, through the API."""
    client = await page.context.new_page()
    await client.goto(url + "/healthz")
    for _ in range(jobs):
        answer = await client.evaluate(
            "fetch('/v1/jobs', {method: 'POST', headers: {'Content-Type': 'application/json'},"
            " body: JSON.stringify({prompt: 'traffic', preset: 'tiny', n: 2})}).then(r => r.status)"
        )
        assert answer == 202
    await client.close()


async def fill_request(page: playwright_api.Page, prompt: str, **fields: object) -> None:
    await page.fill("#f-prompt", prompt)
    await page.select_option("#f-preset", "tiny")
    for name, value in fields.items():
        await page.fill(f"#f-{name}", str(value))


async def test_a_prompt_becomes_images_with_live_progress_and_a_zip(
    web: Web, page: playwright_api.Page
) -> None:
    await page.goto(web.url + "/")
    await page.wait_for_selector("#f-prompt")
    # A field the server refuses: its message appears beside that field, nowhere else.
    await fill_request(page, "a lighthouse at dusk", steps=100_000)
    await page.click("#generate")
    error = page.locator('[data-error-for="steps"]')
    await playwright_api.expect(error).not_to_be_empty()
    assert "steps" in (await error.inner_text())
    assert await page.locator('[data-error-for="prompt"]').inner_text() == ""

    await page.evaluate(WATCH_PROGRESS)
    await fill_request(page, "a lighthouse at dusk", n=3, steps=24, width=128, height=128)
    await page.press("#f-prompt", "Control+Enter")
    await playwright_api.expect(page.locator('[data-field-box="steps"]')).not_to_have_class(
        "field invalid"
    )
    images = page.locator("#images img")
    await playwright_api.expect(images).to_have_count(3, timeout=60_000)
    for index in range(3):
        loaded = await images.nth(index).evaluate(
            "img => img.decode().then(() => img.naturalWidth)"
        )
        assert loaded == 128
    seen: dict[str, list[int]] = await page.evaluate("window.progressSeen")
    print(f"progress values seen per image: {seen}")
    assert sorted(seen) == ["0", "1", "2"]
    assert all(values[-1] == 100 for values in seen.values())
    moving = [v for values in seen.values() for v in values if 0 < v < 100]
    assert moving, f"no bar stood between 0 and 100: {seen}"
    await playwright_api.expect(page.locator("#job-state")).to_have_text("done")

    async with page.expect_download() as download_info:
        await page.click("#download-zip")
    download = await download_info.value
    archive = zipfile.ZipFile(Path(await download.path()))
    names = sorted(archive.namelist())
    assert len(names) == 3 and all(name.endswith(".png") for name in names)
    assert all(archive.read(name).startswith(b"\x89PNG") for name in names)
    save_screenshot(await page.screenshot(), web.shots / "requester.png")

    # On a phone: one column, nothing wider than the screen.
    await page.set_viewport_size({"width": 390, "height": 844})
    overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than a phone's screen"
    await page.set_viewport_size({"width": 1280, "height": 860})

    # The gallery is this browser's: it is still there after a reload.
    await page.reload()
    gallery = page.locator("#gallery [data-job]")
    await playwright_api.expect(gallery).to_have_count(1)
    await playwright_api.expect(page.locator("#gallery img")).to_have_count(3)


async def test_cancel_stops_a_running_job(web: Web, page: playwright_api.Page) -> None:
    await page.goto(web.url + "/")
    await page.wait_for_selector("#f-prompt")
    # As many images as the workers have slots: all run at once, none waits in a queue.
    await fill_request(page, "a long one", n=4, steps=150, width=256, height=256)
    await page.click("#generate")
    await playwright_api.expect(page.locator("#cancel")).to_be_visible()
    await playwright_api.expect(
        page.locator('[data-index] [role="progressbar"][aria-valuenow]:not([aria-valuenow="0"])')
    ).not_to_have_count(0, timeout=30_000)
    await page.click("#cancel")
    await playwright_api.expect(page.locator("#job-state")).to_have_text(
        "cancelled", timeout=20_000
    )
    await playwright_api.expect(page.locator("#cancel")).to_be_hidden()
    job_id = (await page.locator("#job-meta").inner_text()).split(" ")[0]
    # The orchestrators' record of it follows (the page heard the cancelled results first).
    for _ in range(100):
        status = await page.evaluate(f"fetch('/v1/jobs/{job_id}').then(r => r.json())")
        if status["state"] != "running":
            break
        await asyncio.sleep(0.1)
    print(
        f"cancelled job {job_id}: {status['state']}, tasks {[t['state'] for t in status['tasks']]}"
    )
    assert status["state"] == "cancelled"
    assert all(task["state"] == "failed" for task in status["tasks"])
    await playwright_api.expect(page.locator("#images img")).to_have_count(0)


async def test_the_dashboard_follows_workers_and_the_blacklist(
    web: Web, page: playwright_api.Page
) -> None:
    await page.goto(web.url + "/dashboard")
    await send_traffic(page, web.url, jobs=3)
    rows = page.locator("#workers tr[data-worker]")
    await playwright_api.expect(rows).to_have_count(2, timeout=10_000)

    # A new worker appears within 3 s, without a reload; it goes once it stops.
    newcomer = await web.stack.start_worker("w-newcomer")
    started = asyncio.get_running_loop().time()
    await playwright_api.expect(page.locator('tr[data-worker="w-newcomer"]')).to_be_visible(
        timeout=3_000
    )
    print(f"new worker on the dashboard after {asyncio.get_running_loop().time() - started:.1f} s")
    web.stack.workers.remove(newcomer)
    await newcomer.stop(grace_s=1)
    started = asyncio.get_running_loop().time()
    await playwright_api.expect(page.locator('tr[data-worker="w-newcomer"]')).to_have_count(
        0, timeout=30_000
    )
    print(f"stopped worker gone after {asyncio.get_running_loop().time() - started:.1f} s")

    # Without the admin token the server refuses, and the page says so.
    await page.click('button[data-blacklist="w-page-b"]')
    message = page.locator("#admin-message")
    await playwright_api.expect(message).to_contain_text("Refused")
    not_listed = page.locator('#blacklist tr[data-blacklisted="w-page-b"]')
    await playwright_api.expect(not_listed).to_have_count(0)

    await page.fill("#admin-token", ADMIN_TOKEN)
    await page.click('button[data-blacklist="w-page-b"]')
    await playwright_api.expect(message).to_contain_text("Blacklisted")
    await playwright_api.expect(
        page.locator('#blacklist tr[data-blacklisted="w-page-b"]')
    ).to_be_visible(timeout=5_000)

    # More traffic for the chart and the recent jobs, then the screenshot.
    await send_traffic(page, web.url, jobs=3)
    await playwright_api.expect(page.locator("#jobs tbody tr")).to_have_count(6, timeout=30_000)
    await page.wait_for_timeout(1500)
    await page.set_viewport_size({"width": 1280, "height": 1180})
    await page.evaluate("window.scrollTo(0, 0)")
    save_screenshot(await page.screenshot(), web.shots / "dashboard.png")

    await page.set_viewport_size({"width": 390, "height": 844})
    overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the dashboard is {overflow} px wider than a phone's screen"

    await page.click('button[data-unblacklist="w-page-b"]')
    await playwright_api.expect(not_listed).to_have_count(0, timeout=5_000)
    await playwright_api.expect(page.locator('button[data-blacklist="w-page-b"]')).to_be_visible()


async def test_a_server_with_a_token_asks_for_it_once(stack: Stack) -> None:
    await stack.start_orchestrator()
    await stack.start_worker("w-token")
    async with (
        serve_web(stack.nats_url, token="page-token", rate_per_minute=0.0) as server,
        playwright_api.async_playwright() as driver,
    ):
        browser = await driver.chromium.launch(executable_path=CHROMIUM)
        page = await browser.new_page()
        await page.goto(server.url + "/")
        await page.fill("#access-token", "page-token")
        await page.click("text=Use token")
        # The token goes as a header to the API and in the URL of images and events.
        await fill_request(page, "behind a token", n=2)
        await page.click("#generate")
        images = page.locator("#images img")
        await playwright_api.expect(images).to_have_count(2, timeout=60_000)
        width = await images.nth(1).evaluate("img => img.decode().then(() => img.naturalWidth)")
        assert width == 64  # the tiny preset's size
        await playwright_api.expect(page.locator("#job-state")).to_have_text("done")
        # The dashboard, in a browser that has no token yet: it asks, then follows the
        # pool's event stream with it.
        dashboard = await (await browser.new_context()).new_page()
        await dashboard.goto(server.url + "/dashboard")
        await dashboard.fill("#access-token", "page-token")
        await dashboard.click("text=Use token")
        await playwright_api.expect(dashboard.locator('tr[data-worker="w-token"]')).to_be_visible(
            timeout=5_000
        )
        await playwright_api.expect(dashboard.locator("#updated")).to_contain_text("live")
        await browser.close()
