"""A real `usage-proxy serve` process (for kill -9, SIGTERM and full-run logs), its store read
straight from the SQLite file, and a stream client that keeps what it received."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import ROOT, ConfigFactory, ProxyProcess, free_port


@pytest.fixture
def proxy_process(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """Write a config (real pricing and plans; `config.write` arguments) on SQLite and give a
    not-yet-started process for it."""
    made: list[ProxyProcess] = []

    def make(upstream: TestServer, **kwargs: object) -> ProxyProcess:
        port = free_port()
        factory = ConfigFactory(tmp_path / "config", "sqlite:///proxy.db")
        server = f"port = {port}\n" + str(kwargs.pop("server", ""))
        path = factory.write(
            upstream_url=str(upstream.make_url("")).rstrip("/"), server=server, **kwargs
        )
        made.append(ProxyProcess(path, port))
        return made[-1]

    yield make
    for process in made:
        process.kill()


def store_rows(config_path: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Read the proxy's SQLite file directly (WAL: a reader never blocks the proxy)."""
    with sqlite3.connect(config_path.parent / "proxy.db", timeout=10) as db:
        return db.execute(sql, params).fetchall()


@dataclass
class StreamResult:
    status: int | None = None
    body: bytes = b""
    error: str | None = None  # how the stream broke, when it did
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def completed(self) -> bool:
        return b"event: message_stop" in self.body


async def stream_message(
    http: aiohttp.ClientSession,
    url: str,
    key: str,
    *,
    headers: dict[str, str] | None = None,
    started: asyncio.Event | None = None,
    max_tokens: int = 1024,
    model: str = "claude-haiku-4-5",
) -> StreamResult:
    """POST a streaming message and read it to its end (or its break); `started` is set once
    the response head and the first bytes arrived."""
    result = StreamResult()
    body = {
        "model": model,
        "max_tokens": max_tokens,
        "stream": True,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
    }
    try:
        async with http.post(
            f"{url}/v1/messages", json=body, headers={"x-api-key": key, **(headers or {})}
        ) as response:
            result.status = response.status
            result.headers = {name.lower(): value for name, value in response.headers.items()}
            async for chunk in response.content.iter_any():
                result.body += chunk
                if started is not None and not started.is_set():
                    started.set()
    except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
        result.error = type(exc).__name__
    finally:
        if started is not None:
            started.set()  # a request that failed before any byte also counts as "no longer waiting"
    return result


def verify_cli(config_path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "admin", "verify", "--config", str(config_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def exchange_raw(port: int, request: bytes, *, whole: bool = True) -> bytes:
    """Send bytes as they are (no client library tidies them) and read the answer (its status
    line only when not `whole`: a server may keep waiting for a body it was promised)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    read = reader.read() if whole else reader.readline()
    answer = await asyncio.wait_for(read, timeout=10)
    writer.close()
    return answer


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])
