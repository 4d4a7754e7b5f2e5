"""Two `usage-proxy serve` processes sharing one PostgreSQL database: one set of limits."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.settings import StoreSettings
from proxy.store import open_store
from tests.conftest import ADMIN_TOKEN, ALICE_KEY, BOB_KEY, ConfigFactory, ProxyProcess, free_port
from tests.test_extra_usage_e2e import TINY_PLANS, org

ORG = org(
    "team",
    """
extra_usage = "all"
monthly_spend_limit_usd = 0.07
credits_usd = 0.06
auto_reload = { threshold_usd = 0.02, amount_usd = 0.05 }
""",
)
BODY = json.dumps(
    {
        "model": "claude-sonnet-4-5",
        "max_tokens": 200,
        "messages": [{"role": "user", "content": "Hello there"}],
    }
).encode()


@pytest.fixture
async def replicas(
    postgres_url: str, upstream: TestServer, tmp_path: Path
) -> AsyncIterator[tuple[list[str], Path]]:
    """Two replicas started at the same moment on an empty database (both migrate and apply
    orgs.toml at once), against the mock upstream on a real socket."""
    config = ConfigFactory(tmp_path / "config", postgres_url)
    path = config.write(
        upstream_url=str(upstream.make_url("")).rstrip("/"), orgs=ORG, plans=TINY_PLANS
    )
    processes = [ProxyProcess(path, free_port()), ProxyProcess(path, free_port())]
    try:
        await asyncio.gather(*(asyncio.to_thread(p.start) for p in processes))
        yield [p.url for p in processes], path
        for p in processes:
            p.signal(signal.SIGTERM)
        for p in processes:
            assert await p.wait() == 0  # a clean shutdown settles what was in flight
    finally:
        for p in processes:
            p.kill()


async def ask(session: aiohttp.ClientSession, url: str, key: str) -> int:
    headers = {"x-api-key": key, "x-mock-output-tokens": "200", "x-mock-delay-ms": "20"}
    async with session.post(f"{url}/v1/messages", data=BODY, headers=headers) as response:
        await response.read()
        return response.status


async def test_limits_balance_and_reloads_hold_across_two_replicas(
    replicas: tuple[list[str], Path], postgres_url: str
) -> None:
    urls, config_path = replicas
    first, second = urls
    async with aiohttp.ClientSession() as session:
        # both sessions crossed (one replica each): what follows is extra usage
        assert await ask(session, first, ALICE_KEY) == 200
        assert await ask(session, second, BOB_KEY) == 200
        statuses = await asyncio.gather(
            *(ask(session, urls[i % 2], (ALICE_KEY, BOB_KEY)[i // 2 % 2]) for i in range(200))
        )
        # a purchase replayed on both replicas at once buys once
        purchases = await asyncio.gather(
            *(
                session.post(
                    f"{url}/admin/v1/orgs/acme/credits",
                    json={"amount_usd": "0.5", "idempotency_key": "po-7"},
                    headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
                )
                for url in urls
                for _ in range(5)
            )
        )
        assert {p.status for p in purchases} <= {200, 201}
        for p in purchases:
            p.release()
    ok = statuses.count(200)
    assert 10 <= ok <= 40, statuses  # about 23 fit the $0.07 limit at ~$0.003 each
    assert set(statuses) == {200, 429}  # the rest are refused, none fails
    store = await open_store(StoreSettings(url=postgres_url))
    try:
        for _ in range(100):  # settlements run just after the answers
            if await store.pending_count() == 0:
                break
            await asyncio.sleep(0.05)
        transfers = await store.list_transfers("acme")
        kinds = [t.kind for t in transfers]
        assert [t.amount_nanos for t in transfers if t.kind == "reload"] == [50_000_000]
        assert kinds.count("purchase") == 2  # credits_usd, applied by both replicas, + po-7
        spent_nanos = -sum(t.amount_nanos for t in transfers if t.kind == "usage_extra")
        assert 0 < spent_nanos <= 70_000_000  # within the org limit, reserved in advance
        posted = [r for r in await store.recent_requests(500) if r.status == "posted"]
        assert len(posted) == ok + 2  # every answered request settled exactly once
        verification = await store.verify(1e12)
        assert verification.mismatches == () and verification.pending_reservations == 0
    finally:
        await store.close()
    # and the operator's check agrees, from the command line
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "proxy", "admin", "verify", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mismatches: 0" in result.stdout
