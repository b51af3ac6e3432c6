"""The ledger page in a real headless browser (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import asyncio
import shutil
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import sync_playwright

from tests.ledger_traffic import POLICY, make_keys, one
from tests.procs import ROOT, Gateway, RedisServer, Sim

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# flags for a closed network, as root, in a container (no sandbox, no background networking)
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def money(value: Decimal, shown_total: Decimal) -> str:
    """What the page shows: cents from $100, 4 decimals from $1, else 6; rounded half up."""
    digits = 2 if shown_total >= 100 else 4 if shown_total >= 1 else 6
    return f"${value.quantize(Decimal(1).scaleb(-digits), rounding='ROUND_HALF_UP'):,}"


def test_ledger_page_shows_cost_per_tier_and_tenant(tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path)
    small, f1, f2 = Sim("tiny-small", tmp_path), Sim("tiny-frontier", tmp_path), Sim("tiny-frontier", tmp_path)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(small=small.url, f1=f1.url, f2=f2.url))
    gw = Gateway(policy, tmp_path, {"GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_ADMIN_TOKEN": "finance"})
    try:
        keys = asyncio.run(make_keys(redis_server.url))

        async def traffic() -> None:
            async with httpx.AsyncClient(timeout=30) as client:
                for i in range(60):
                    if i % 10 != 5:  # complete requests only: the totals below are exact
                        await one(client, gw.url, i * 7, keys["media" if i % 3 else "ads"])

        asyncio.run(traffic())
        import time

        time.sleep(0.5)
        report = httpx.get(
            f"{gw.url}/admin/ledger", params={"group_by": "tenant,tier"}, headers={"authorization": "Bearer finance"}
        ).json()["data"]
        total = sum((Decimal(r["cost_usd"]) for r in report), Decimal(0))
        media_total = sum((Decimal(r["cost_usd"]) for r in report if r["tenant"] == "media"), Decimal(0))
        assert total > 0 and {r["tier"] for r in report} == {"small", "frontier"}

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 900}, accept_downloads=True)
            page.goto(f"{gw.url}/ledger")
            assert page.title() == "Ledger — LLM gateway"
            page.fill("#token", "wrong")
            page.click("#load")
            page.wait_for_selector("#status.error")
            assert "admin token" in page.inner_text("#status")
            page.fill("#token", "finance")
            page.click("#load")
            page.wait_for_selector("#grand-total")
            assert page.inner_text("#grand-total") == money(total, total)
            assert page.locator("#table tbody tr").count() == 2  # ads and media
            assert page.locator("#chart rect[data-tier='small']").count() >= 1
            assert page.locator("#chart rect[data-tier='frontier']").count() >= 1
            assert page.inner_text("#legend").split() == ["frontier", "small"]
            page.screenshot(path=str(ROOT / "docs" / "ledger-page.png"), full_page=True)
            page.select_option("#tenant", "media")
            page.wait_for_function("document.querySelectorAll('#table tbody tr').length === 1")
            assert page.inner_text("#grand-total") == money(media_total, media_total)
            with page.expect_download() as download:
                page.click("#csv")
            csv_text = Path(download.value.path()).read_text()
            assert (
                csv_text.splitlines()[0] == "day,tenant,tier,route,model,requests,input_tokens,output_tokens,cost_usd"
            )
            page.fill("#since", "2000-01-01")
            page.fill("#until", "2000-01-02")
            page.click("#load")
            page.wait_for_function("document.querySelector('#status').textContent === '0 requests'")
            browser.close()
    finally:
        gw.stop()
        for s in (small, f1, f2):
            s.stop()
        redis_server.stop()
