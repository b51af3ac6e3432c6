"""The ledger page in a real headless browser (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import Iterator
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


@contextlib.contextmanager
def page_stack(tmp: Path, policy_text: str, env: dict[str, str]) -> Iterator[tuple[Gateway, RedisServer]]:
    """A redis-server, a small and two frontier simulators and a gateway with the admin token
    "finance" (``policy_text`` formatted with their URLs); all stopped afterwards."""
    with contextlib.ExitStack() as started:
        redis_server = RedisServer(tmp)
        started.callback(redis_server.stop)
        sims: list[Sim] = []
        for model in ("tiny-small", "tiny-frontier", "tiny-frontier"):
            sims.append(Sim(model, tmp))
            started.callback(sims[-1].stop)
        policy = tmp / "policy.yaml"
        policy.write_text(policy_text.format(small=sims[0].url, f1=sims[1].url, f2=sims[2].url))
        gw = Gateway(policy, tmp, {"GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_ADMIN_TOKEN": "finance", **env})
        started.callback(gw.stop)
        yield gw, redis_server


def test_ledger_page_shows_cost_per_tier_and_tenant(tmp_path: Path) -> None:
    with page_stack(tmp_path, POLICY, {}) as (gw, redis_server):
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
        tasks = httpx.get(
            f"{gw.url}/admin/ledger", params={"group_by": "task,tier"}, headers={"authorization": "Bearer finance"}
        ).json()["data"]
        assert {(r["task"], r["tier"]) for r in tasks} >= {("classification", "small")}

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
            page.wait_for_function(f"document.querySelectorAll('#tasks tbody tr').length === {len(tasks)}")
            assert page.locator("#tasks tbody tr[data-task='classification'][data-tier='small']").count() == 1
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


GPU_POLICY = POLICY.replace(
    "price: {{input: 0.10, output: 0.40}}", "price: {{input: 0.10, output: 0.40}}\n    gpu_hour: {{usd: 2.50}}"
).replace(
    "price: {{input: 3.00, output: 15.00}}",
    "price: {{input: 3.00, output: 15.00}}\n    gpu_hour: {{usd: 4.10, gpus_per_worker: 2}}",
)


@pytest.mark.timeout(300)
def test_ledger_page_shows_gpu_used_and_idle_per_tier(tmp_path: Path) -> None:
    admin = {"authorization": "Bearer finance"}
    with page_stack(tmp_path, GPU_POLICY, {"GATEWAY_HEALTH_INTERVAL_S": "0.2"}) as (gw, redis_server):
        keys = asyncio.run(make_keys(redis_server.url))

        async def traffic() -> None:
            async with httpx.AsyncClient(timeout=30) as client:
                for i in range(24):
                    await one(client, gw.url, i * 7, keys["media" if i % 3 else "ads"])

        asyncio.run(traffic())
        deadline = time.monotonic() + 20
        while True:  # both tiers' workers have up time and some of it was used
            data = httpx.get(f"{gw.url}/admin/ledger/gpu", headers=admin).json()["data"]
            if len(data) == 2 and all(Decimal(d["used_usd"]) > 0 for d in data):
                break
            assert time.monotonic() < deadline, data
            time.sleep(0.2)
        for d in data:  # the API's own arithmetic, to the micro-dollar
            tenants = sum((Decimal(v) for v in d["tenants"].values()), Decimal(0))
            assert tenants == Decimal(d["used_usd"])
            assert Decimal(d["used_usd"]) + Decimal(d["idle_usd"]) == Decimal(d["total_usd"])
        assert httpx.get(f"{gw.url}/admin/ledger/gpu", params={"since": "yesterday"}, headers=admin).status_code == 400

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 1100})
            page.goto(f"{gw.url}/ledger")
            page.fill("#token", "finance")
            with page.expect_response(lambda r: "/admin/ledger/gpu" in r.url) as got:
                page.click("#load")
            shown = got.value.json()["data"]  # what the page was given: it moves on as the workers stay up
            page.wait_for_selector("#gpu tbody tr[data-tier='small']")
            assert page.is_visible("#gpu-card")
            for tier in ("frontier", "small"):
                [d] = [d for d in shown if d["tier"] == tier]
                row = f"#gpu tbody tr[data-tier='{tier}']"
                assert page.inner_text(f"{row} td.used") == f"${Decimal(d['used_usd']):,}"
                assert page.inner_text(f"{row} td.idle") == f"${Decimal(d['idle_usd']):,}"
                assert page.inner_text(f"{row} td.total") == f"${Decimal(d['total_usd']):,}"
            page.screenshot(path=str(ROOT / "docs" / "ledger-page-gpu.png"), full_page=True)
            browser.close()
