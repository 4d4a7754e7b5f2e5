"""PostgreSQL faults: the server goes away mid-load and comes back, the pool runs dry.

The proxy reaches PostgreSQL through a TCP relay that the test controls: stopping the relay cuts
every connection and refuses new ones, which is what a server restart looks like from the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tomllib
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestServer

from proxy.appkeys import STORE
from proxy.auth import hash_key
from proxy.clock import FakeClock
from proxy.ledger import Admitted
from proxy.orgfile import parse_orgs
from proxy.settings import StoreSettings
from proxy.store import open_store
from tests.conftest import ALICE_KEY, BOB_KEY, DEFAULT_ORGS, quiet
from tests.store.test_contract import NOW_S, PLANS, TIERS, asking, settling

STREAM = json.dumps(
    {
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "stream": True,
        "messages": [{"role": "user", "content": "Hello there"}],
    }
).encode()


class TcpRelay:
    """127.0.0.1:<port> -> the PostgreSQL server, with an off switch."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Refuse new connections and cut the open ones."""
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
        self._writers.discard(writer)


@pytest.fixture
async def relay(postgres_url: str) -> AsyncIterator[TcpRelay]:
    relay = TcpRelay(5432)
    await relay.start()
    yield relay
    with contextlib.suppress(Exception):
        await relay.stop()


@pytest.fixture
def store_url(postgres_url: str, relay: TcpRelay) -> str:
    """The proxy under test reaches the test's schema through the relay."""
    return postgres_url.replace(":5432/", f":{relay.port}/")


async def stream(proxy: TestServer, started: asyncio.Event | None = None) -> int:
    """A ~1 s stream; sets `started` once its headers arrived (it was admitted)."""
    headers = {"x-api-key": ALICE_KEY, "x-mock-deltas": "10", "x-mock-delay-ms": "100"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(proxy.make_url("/v1/messages"), data=STREAM, headers=headers) as response,
    ):
        if started is not None:
            started.set()
        body = await response.read()
        assert response.status != 200 or b"message_stop" in body
        return response.status


async def post(
    proxy: TestServer, path: str = "/v1/messages", key: str = ALICE_KEY
) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        if path == "/readyz":
            response = await http.get(proxy.make_url(path))
        else:
            response = await http.post(
                proxy.make_url(path),
                data=STREAM.replace(b"true", b"false"),
                headers={"x-api-key": key},
            )
        return response.status, await response.json()


async def test_a_store_restart_mid_load_fails_new_requests_cleanly_and_loses_no_charge(
    start_proxy, relay: TcpRelay, clock: FakeClock
) -> None:
    proxy = await start_proxy()
    assert (await post(proxy))[0] == 200
    events = [asyncio.Event() for _ in range(8)]
    streams = [asyncio.ensure_future(stream(proxy, event)) for event in events]
    await asyncio.gather(*(event.wait() for event in events))  # all admitted, relaying

    await relay.stop()  # the database goes away while 8 streams run
    status, body = await post(proxy, key=BOB_KEY)  # no lease: his admission needs the server
    assert status == 503 and body["error"]["type"] == "api_error"
    assert "nothing was charged" in body["error"]["message"]
    assert (await post(proxy, "/readyz"))[0] == 503
    # alice's lease (taken with her first request) admits her from memory, into the journal
    assert (await post(proxy))[0] == 200
    assert await asyncio.gather(*streams) == [200] * 8  # the answers never needed the store

    await asyncio.sleep(0.3)  # their settlements are refused meanwhile, and retried
    await relay.start()  # back on the same port: the pool reconnects
    assert (await post(proxy, "/readyz"))[0] == 200
    assert (await post(proxy))[0] == 200

    store = proxy.app[STORE]
    for _ in range(200):
        if await store.pending_count() == 0:
            break
        await asyncio.sleep(0.05)
    records = await store.recent_requests(50)
    # 1 + 8 + 1 + 1 answered requests, each posted once; the refused one was never admitted
    assert [r.status for r in records] == ["posted"] * 11
    assert all(r.cost_nanos > 0 for r in records)
    verification = await store.verify(clock.now_s() + 3600)
    assert verification.mismatches == () and verification.pending_reservations == 0


async def test_an_exhausted_pool_makes_requests_wait_then_answers_a_clear_503(
    start_proxy, postgres_url: str
) -> None:
    # without a journal, so without leases: every admission goes through the server
    proxy = await start_proxy(store='pool_size = 1\npool_timeout_s = 0.3\njournal = ""')
    assert (await post(proxy))[0] == 200
    await quiet(proxy)  # its settlement, which follows the answer, must not be the one waiting
    holder = await asyncpg.connect(postgres_url)
    try:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("SELECT 1 FROM members WHERE email = 'alice@acme.test' FOR UPDATE")
        # alice's next admission waits for her row, holding the pool's only connection
        blocked = asyncio.ensure_future(post(proxy))
        for _ in range(200):
            waiting = await holder.fetchval(  # sessions that wait for the holder's lock
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))"
            )
            if waiting:
                break
            await asyncio.sleep(0.02)
        assert waiting == 1
        status, body = await post(proxy)  # no connection within 0.3 s
        assert status == 503 and body["error"]["type"] == "api_error"
        assert not blocked.done()
        await transaction.rollback()
        assert (await blocked)[0] == 200  # the waiting one goes through once the row is free
    finally:
        await holder.close()


async def test_members_of_one_org_spend_included_quota_without_waiting_for_each_other(
    postgres_url: str,
) -> None:
    """Only money steps take the org's row lock: while alice's row is held, bob is admitted and
    settled on included quota, and alice's admission waits for her row (not the org's)."""
    store = await open_store(StoreSettings(url=postgres_url))
    holder = await asyncpg.connect(postgres_url)
    try:
        await store.apply_orgs(parse_orgs(tomllib.loads(DEFAULT_ORGS), "orgs.toml", PLANS), NOW_S)
        bob = await store.find_seat(hash_key(BOB_KEY))
        alice = await store.find_seat(hash_key(ALICE_KEY))
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("SELECT 1 FROM members WHERE id = $1 FOR UPDATE", alice.member_id)
        waiting = asyncio.ensure_future(store.admit(asking(alice.member_id, "a1", 1), TIERS))
        admitted = await asyncio.wait_for(store.admit(asking(bob.member_id, "b1", 1), TIERS), 10)
        assert isinstance(admitted.decision, Admitted)
        assert await asyncio.wait_for(store.settle(settling("b1", 5), TIERS), 10) is not None
        assert not waiting.done()
        await transaction.rollback()
        assert isinstance((await asyncio.wait_for(waiting, 10)).decision, Admitted)
    finally:
        await holder.close()
        await store.close()
