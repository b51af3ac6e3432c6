"""``Runtime``: the long-lived objects a request reads — settings, the current policy snapshot,
the worker pool and the dispatcher. Built by ``app.create_app``; swapping ``policy`` is the only
mutation, and it replaces one reference so each request keeps the snapshot it started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import time

from gateway.admission import Admitter
from gateway.auth import Authenticator
from gateway.dispatch import Dispatcher
from gateway.ledger import Ledger
from gateway.logging import RequestLog
from gateway.metrics import Recorder
from gateway.policy.schema import Policy
from gateway.pool import WorkerPool
from gateway.resp import REDIS_ERRORS
from gateway.response_index import ResponseIndex
from gateway.settings import Settings
from gateway.shadow import Shadower
from gateway.store import Client


class Runtime:
    def __init__(
        self,
        settings: Settings,
        policy: Policy,
        pool: WorkerPool,
        dispatcher: Dispatcher,
        auth: Authenticator,
        admitter: Admitter,
        redis: Client,
        ledger: Ledger,
        responses: ResponseIndex,
        request_log: RequestLog | None = None,
    ):
        self.settings = settings
        self.policy = policy
        self.pool = pool
        self.dispatcher = dispatcher
        self.auth = auth
        self.admitter = admitter
        self.redis = redis
        self.ledger = ledger
        self.responses = responses
        self.shadows = Shadower(dispatcher, ledger, redis, rng=random.Random())
        self.request_log = request_log or RequestLog()
        self.budget_used_pct: dict[str, int] = {}  # refreshed in the background, read by routing
        self.metrics = Recorder()
        self.metrics.policy(policy.revision)
        self.started = time.time()
        self.in_flight = 0  # requests between the top of api._serve and their end (a stream's relay close)
        # Request ids: a random prefix per process and a counter — unique without a syscall per request.
        self._id_prefix = os.urandom(6).hex()
        self._ids = itertools.count(1)

    async def follow_budgets(self, interval_s: float = 1.0) -> None:
        """Keep ``budget_used_pct`` fresh for routes that match on it (never a Redis call per request)."""
        while True:
            if self.policy.budgets:
                with contextlib.suppress(*REDIS_ERRORS):  # keep the last known figures
                    self.budget_used_pct = await self.admitter.budget_used_pct(self.policy)
            await asyncio.sleep(interval_s)

    def next_request_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):012x}"

    def swap_policy(self, policy: Policy) -> None:
        self.pool.sync(policy)
        self.policy = policy
        self.metrics.policy(policy.revision)
