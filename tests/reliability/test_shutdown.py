"""SIGTERM to a real `usage-proxy serve`: it stops accepting at once, lets in-flight streams
finish within `server.shutdown_grace_s`, settles every one of them and exits 0."""

from __future__ import annotations

import asyncio
import signal
import socket

import aiohttp

from tests.reliability.conftest import store_rows, stream_message, verify_cli
from tests.reliability.test_crash import KEY, ORGS, PLANS

STREAMS = 20


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:  # queued as the listening socket closed: the kernel reset it
        return True
    return False


async def start_streams(proxy, http, headers):
    starts = [asyncio.Event() for _ in range(STREAMS)]
    streams = [
        asyncio.ensure_future(
            stream_message(http, proxy.url, KEY, headers=headers, started=started)
        )
        for started in starts
    ]
    await asyncio.wait_for(asyncio.gather(*(s.wait() for s in starts)), timeout=60)
    return streams


async def test_sigterm_lets_streams_finish_within_the_grace_then_exits_0(
    proxy_process, upstream
) -> None:
    proxy = proxy_process(upstream, orgs=ORGS, plans=PLANS, server="shutdown_grace_s = 30")
    proxy.start()
    slow = {"x-mock-deltas": "20", "x-mock-output-tokens": "40", "x-mock-delay-ms": "150"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        streams = await start_streams(proxy, http, slow)
        proxy.signal(signal.SIGTERM)
        for _ in range(100):  # the listening socket closes at once
            if refuses_connections(proxy.port):
                break
            await asyncio.sleep(0.05)
        assert refuses_connections(proxy.port)
        assert not all(s.done() for s in streams)  # refused while streams were still relaying
        results = await asyncio.gather(*streams)
    assert await proxy.wait() == 0
    assert all(r.status == 200 and r.completed for r in results), [r.error for r in results]
    assert store_rows(
        proxy.config_path,
        "SELECT status, outcome, output_tokens, COUNT(*) FROM requests GROUP BY 1, 2, 3",
    ) == [("posted", "ok", 40, STREAMS)]
    verified = verify_cli(proxy.config_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr


async def test_streams_beyond_the_grace_are_cut_and_charged_then_exit_0(
    proxy_process, upstream
) -> None:
    proxy = proxy_process(upstream, orgs=ORGS, plans=PLANS, server="shutdown_grace_s = 1")
    proxy.start()
    endless = {"x-mock-deltas": "400", "x-mock-output-tokens": "800", "x-mock-delay-ms": "200"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        streams = await start_streams(proxy, http, endless)
        proxy.signal(signal.SIGTERM)
        results = await asyncio.gather(*streams)
    assert await proxy.wait() == 0
    assert not any(r.completed for r in results)
    # the proxy broke them off (a client timeout would mean the grace was not applied)
    assert all(r.error not in (None, "TimeoutError") for r in results), [r.error for r in results]
    rows = store_rows(
        proxy.config_path,
        "SELECT status, output_estimated, cost_nanos > 0 FROM requests",
    )
    # cut by the grace period: charged as a cut stream (input, estimated output), none pending
    assert rows == [("posted", 1, 1)] * STREAMS
    verified = verify_cli(proxy.config_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr
