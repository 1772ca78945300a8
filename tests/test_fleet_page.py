"""The fleet page end to end in headless Chromium (Debian's `chromium`, driven by Playwright's
`executable_path`): a real hub with its managed Mosquitto, its own model, and two real agents as
child processes. Screenshots at 1280x800 are kept under test-artifacts/ui/."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import httpx
import pytest

from tandem import AsyncClient, Budget
from tests.hubkit import ROOT, kill, needs_mosquitto, running_hub, spawn_agent, start_agent, tiny_llama, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "test-artifacts" / "ui"
XSS = "<script>alert(1)</script>"
pytestmark = [
    needs_mosquitto,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)"),
]
playwright = pytest.importorskip("playwright.async_api", reason="playwright is not installed (make test installs it)")
expect = playwright.expect
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip
"""Without the background-networking flags Chromium dials Google's hosts at start, which this
machine's closed network refuses."""


async def _browser(pw):  # type: ignore[no-untyped-def]
    return await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)


async def _no_sideways_scroll(page) -> None:  # type: ignore[no-untyped-def]
    widths = await page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert widths[0] <= widths[1], f"the page scrolls sideways at 1280 px: {widths[0]} > {widths[1]}"


async def _login(page, base: str, key: str) -> None:  # type: ignore[no-untyped-def]
    await page.goto(f"{base}/ui")
    await page.fill("input[name=api_key]", key)
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{base}/ui")


async def test_fleet_page_live_in_chromium(tmp_path: Path) -> None:
    model = str(tiny_llama(tmp_path))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with running_hub(tmp_path / "hub", cloud_model=model, http_listen="127.0.0.1:0") as hub:
        key = hub.registry.create_api_key("operator")
        base = f"http://{hub.http_address}"
        # one agent a child process (to be killed), the other in this process (cheaper to start)
        procs = [spawn_agent(hub, model, tmp_path / "a", "edge-a")]
        second = await start_agent(hub, Path(model), tmp_path / "b", XSS, model_name=model)
        try:
            await wait_for(lambda: len(hub.fleet.online()) == 2, timeout=60)
            ids = {s.record.name: s.device_id for s in hub.fleet.online()}
            async with playwright.async_playwright() as pw:
                browser = await _browser(pw)
                page = await browser.new_page(viewport={"width": 1280, "height": 800})
                dialogs: list[str] = []
                page.on("dialog", lambda d: (dialogs.append(d.message), asyncio.ensure_future(d.dismiss())))
                await _login(page, base, key)

                # 1. both agents are listed, online; the hostile name is text, and no dialog opened
                rows = page.locator("#fleet tr.device.edge")
                await expect(page.locator("#fleet tr.device.edge.online")).to_have_count(2, timeout=10_000)
                assert await page.locator(f"tr[data-device='{ids['edge-a']}'] .status").inner_text() == "online"
                assert await page.locator(f"tr[data-device='{ids[XSS]}'] .name").inner_text() == XSS
                assert "tiny" in (await rows.first.inner_text()) or model in await page.inner_text("#fleet")
                await expect(page.locator("#live")).to_have_text("live")  # the event stream is open
                await page.screenshot(path=str(ARTIFACTS / "fleet.png"))
                await _no_sideways_scroll(page)

                # 2. a killed agent's row turns offline within 5 s, without a reload
                loaded = await page.evaluate("performance.timeOrigin")
                kill(procs[0])
                selector = f"tr[data-device='{ids['edge-a']}'].offline"
                await page.wait_for_selector(selector, timeout=5000)
                assert await page.evaluate("performance.timeOrigin") == loaded  # the same document
                assert await page.locator(f"tr[data-device='{ids[XSS]}'] .status").inner_text() == "online"

                # 3. a request through the SDK appears with its placement, predicted and measured figures
                async with AsyncClient(hub.address, api_key=key) as client:
                    result = await client.generate(
                        "the cat sat on the mat", max_tokens=8, budget=Budget(ttft_ms=60_000, tpot_ms=60_000)
                    )
                placement = result.placements[0]
                record = hub.service.journal.recent(1)[0]
                row = page.locator(f"tr[data-request='{record.id}'].ok")  # shown finished (it may show running first)
                await row.wait_for(timeout=5000)
                text = await row.inner_text()
                where = "cloud" if placement.kind == "cloud" else XSS
                assert f"{placement.kind}: {where}" in text
                predicted_ms = f"{placement.predicted_ttft_ms:.0f} ms" if placement.predicted_ttft_ms >= 10 else None
                assert predicted_ms is None or predicted_ms in text
                assert re.search(r"/ \d+(\.\d)? ms", text), text  # a measured TTFT beside the prediction
                assert "kept" in text and record.kept is True
                await expect(page.locator("#plots circle").first).to_be_visible()  # its point is plotted
                await page.screenshot(path=str(ARTIFACTS / "fleet-served.png"))

                # 4. opening it shows the router's candidates, the chosen one first
                await row.locator("a").click()
                await page.wait_for_url(f"{base}/ui/requests/{record.id}")
                candidates = page.locator("table.candidates tbody tr")
                assert await candidates.count() == 2  # the live agent and the cloud (the dead one is gone)
                assert "chosen" in await candidates.first.inner_text()
                assert "fits" in await candidates.nth(1).inner_text()
                await page.screenshot(path=str(ARTIFACTS / "request.png"))
                await _no_sideways_scroll(page)
                assert dialogs == []
                await browser.close()
            for path in ("fleet.png", "fleet-served.png", "request.png"):
                assert (ARTIFACTS / path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        finally:
            for proc in procs:
                kill(proc)
            await second.close()


async def test_fleet_page_refuses_without_login_and_csrf(tmp_path: Path) -> None:
    model = str(tiny_llama(tmp_path))
    async with running_hub(tmp_path / "hub", cloud_model=model, http_listen="127.0.0.1:0") as hub:
        key = hub.registry.create_api_key("operator")
        base = f"http://{hub.http_address}"
        agent = await start_agent(hub, Path(model), tmp_path / "a", "secret-device", model_name=model)
        try:
            device = agent.device_id
            async with httpx.AsyncClient(base_url=base, timeout=10) as anon:
                # no session, or a made-up one: the login form (401) and no data, the event stream included
                for cookies in ({}, {"tandem_session": "forged"}):
                    anon.cookies.clear()
                    anon.cookies.update(cookies)
                    page = await anon.get("/ui")
                    assert page.status_code == 401 and 'name="api_key"' in page.text
                    assert "secret-device" not in page.text and device not in page.text
                    events = await anon.get("/ui/events")
                    assert events.status_code == 401 and "event:" not in events.text and device not in events.text
                    detail = await anon.get("/ui/requests/r1")
                    assert detail.status_code == 401 and device not in detail.text
                anon.cookies.clear()
                # a wrong key at the login form: the form again, an error, no session cookie
                form = await anon.get("/ui/login")
                csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
                wrong = await anon.post("/ui/login", data={"api_key": "tdk_wrong", "csrf": csrf})
                assert wrong.status_code == 401 and "not one of this hub" in wrong.text
                assert "tandem_session" not in wrong.cookies and device not in wrong.text
                # the login form's own CSRF value is needed too
                anon.cookies.clear()
                assert (await anon.post("/ui/login", data={"api_key": key})).status_code == 403

            async with httpx.AsyncClient(base_url=base, timeout=10) as user:
                form = await user.get("/ui/login")
                csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
                login = await user.post("/ui/login", data={"api_key": key, "csrf": csrf})
                assert login.status_code == 303
                cookie = login.headers["set-cookie"]
                assert "HttpOnly" in cookie and "SameSite=strict" in cookie
                page = await user.get("/ui")
                assert page.status_code == 200 and "secret-device" in page.text
                assert key not in page.text and "Content-Security-Policy" in page.headers
                token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
                # state-changing requests without their CSRF token, with a wrong one, or from another site
                revoke = f"/ui/devices/{device}/revoke"
                assert (await user.post(revoke)).status_code == 403
                assert (await user.post(revoke, data={"csrf": "x" + token})).status_code == 403
                cross = await user.post(revoke, data={"csrf": token}, headers={"origin": "http://evil.example"})
                assert cross.status_code == 403
                assert (await user.post("/ui/tokens", data={})).status_code == 403
                assert hub.fleet.status_of(device) == "online" and hub.registry.store.get_device(device) is not None
                # with it: the device is revoked, and a new enrollment token comes as a download only
                done = await user.post(revoke, data={"csrf": token})
                assert done.status_code == 303
                assert hub.registry.store.get_device(device) is None and hub.fleet.status_of(device) == "offline"
                made = await user.post("/ui/tokens", data={"csrf": token})
                assert made.status_code == 200 and made.headers["content-disposition"].startswith("attachment")
                assert re.search(r"--token tdt_\S+", made.text) and hub.address in made.text
                # logging out ends the session: the page and its events refuse it
                assert (await user.post("/ui/logout", data={"csrf": token})).status_code == 303
                assert (await user.get("/ui/events")).status_code == 401
        finally:
            await agent.close()
