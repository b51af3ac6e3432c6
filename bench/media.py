"""The media company's day, for real, on simulator workers: the worked example of README's
"Evidence for tiering".

    python -m bench.media [--articles 5000] [--keep --rps 40]

Starts a redis-server, a small-tier and a frontier-tier simulator and a gateway serving
``policies/media-shadow.yaml`` (all calls on the frontier tier, 5% of each task also shadowed to
the small tier), applies that policy as the active version, and sends the pipeline's traffic:
per article a summarization (≈800 prompt + 200 output tokens), a categorization (≈400 + 50) and
SEO metadata (≈600 + 150). The simulators answer from a hash of the prompt (``--answers prompt``),
so both tiers give the same answer — except that the small one writes its own summaries (every
one) and its own SEO copy (for 30% of articles): categorization agrees, the others do not.

It prints ``export GATEWAY_REDIS_URL=…`` for the ``gateway`` commands. With ``--keep`` it goes on
sending the pipeline's traffic at ``--rps`` requests per second until interrupted (a guarded ramp
needs live traffic to watch), then stops everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.procs import Gateway, RedisServer, Sim

ROOT = Path(__file__).resolve().parent.parent
SMALL, FRONTIER = "Qwen/Qwen2.5-1.5B-Instruct", "meta-llama/Llama-3.1-70B-Instruct"
COMMON = [
    "time",
    "year",
    "people",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "government",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "service",
    "friend",
    "father",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "city",
    "community",
    "name",
]
# (task, instruction, prompt words, max_tokens): ≈800, 400 and 600 prompt tokens
TASKS = (
    ("summarization", "Summarize this article in one paragraph:", 785, 200),
    ("categorization", "Categorize this article (one section name):", 385, 50),
    ("seo", "Write SEO metadata (title, description, keywords) for this article:", 580, 150),
)


def prompt(article: int, instruction: str, words: int) -> str:
    rng = random.Random(article)
    body = " ".join(rng.choice(COMMON) for _ in range(words))
    return f"{instruction}\n\nArticle {article}: {body}"


async def send(client: httpx.AsyncClient, url: str, article: int, task: tuple[str, str, int, int]) -> int:
    """One call of the pipeline; the client carries the tenant's API key."""
    name, instruction, words, max_tokens = task
    body = {
        "model": "auto",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": prompt(article, instruction, words)}],
    }
    for attempt in (1, 2):
        try:
            r = await client.post(f"{url}/v1/chat/completions", json=body, headers={"x-gateway-task": name})
            return r.status_code
        except (httpx.ReadError, httpx.RemoteProtocolError):
            if attempt == 2:  # a kept-alive connection the gateway had just closed: once more, as clients do
                return 0
        except httpx.HTTPError:
            return 0  # the gateway went away (Ctrl-C reaches it too)
    return 0


async def day(url: str, key: str, articles: int, concurrency: int) -> dict[int, int]:
    statuses: dict[int, int] = {}
    queue = [(a, t) for a in range(articles) for t in TASKS]
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits, headers=_auth(key)) as client:

        async def worker() -> None:
            while queue:
                a, t = queue.pop()
                s = await send(client, url, a, t)
                statuses[s] = statuses.get(s, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def steady(url: str, key: str, rps: float, first: int, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(timeout=60, headers=_auth(key)) as client:
        article = first
        pending: set[asyncio.Task[int]] = set()
        while not stop.is_set():
            for t in TASKS:
                job = asyncio.create_task(send(client, url, article, t))
                pending.add(job)
                job.add_done_callback(pending.discard)
                await asyncio.sleep(1 / rps)
            article += 1
        if pending:
            await asyncio.wait(pending, timeout=30)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.media", description=__doc__.split("\n\n")[0])
    p.add_argument("--articles", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--keep", action="store_true", help="keep running, sending --rps, until interrupted")
    p.add_argument("--rps", type=float, default=30.0)
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="media-"))
    redis = RedisServer(tmp)
    small = Sim(SMALL, tmp, "--answers", "prompt", "--diverge", "^Summarize", "--diverge", "^Write SEO=0.3")
    frontier = Sim(FRONTIER, tmp, "--answers", "prompt")
    policy = tmp / "media-shadow.yaml"
    text = (ROOT / "policies" / "media-shadow.yaml").read_text()
    policy.write_text(text.replace("http://127.0.0.1:8101", small.url).replace("http://127.0.0.1:8102", frontier.url))
    env = {"GATEWAY_REDIS_URL": redis.url, "GATEWAY_LOG_LEVEL": "warning"}
    gw: Gateway | None = None
    try:
        key = asyncio.run(_prepare(redis.url, policy))
        gw = Gateway(policy, tmp, env)
        print(f"export GATEWAY_REDIS_URL={redis.url}   # gateway {gw.url}; policy {policy}", flush=True)
        started = time.monotonic()
        statuses = asyncio.run(day(gw.url, key, args.articles, args.concurrency))
        took = time.monotonic() - started
        print(f"sent {args.articles:,} articles x 3 calls in {took:.0f}s: statuses {statuses}", flush=True)
        if args.keep:
            print(f"sending {args.rps:g} requests/s until interrupted", flush=True)
            asyncio.run(_until_signal(gw.url, key, args.rps, args.articles))
    finally:
        for proc in (gw, small, frontier, redis):
            if proc is not None:
                proc.stop()


async def _prepare(redis_url: str, policy: Path) -> str:
    """Apply the policy as the active version (what a ramp starts from); the tenant's API key."""
    from gateway import store
    from gateway.keys import KeyStore
    from gateway.policy.store import PolicyStore

    client = store.connect(redis_url, timeout_s=5)
    text = await asyncio.to_thread(policy.read_text)
    source, why = "policies/media-shadow.yaml", "all frontier, 5% shadow to small"
    await PolicyStore(client).apply(text, source=source, author="bench.media", message=why)
    _, key = await KeyStore(client).create("media", "the article pipeline")
    await client.aclose()
    return key


async def _until_signal(url: str, key: str, rps: float, first: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await steady(url, key, rps, first, stop)


if __name__ == "__main__":
    sys.exit(main())
