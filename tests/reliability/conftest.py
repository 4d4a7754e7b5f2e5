"""A real `usage-proxy serve` process (for kill -9, SIGTERM and full-run logs), its store read
straight from the SQLite file, and a stream client that keeps what it received."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import ADMIN_TOKEN, UPSTREAM_KEY, ConfigFactory

ROOT = Path(__file__).resolve().parent.parent.parent
READY_LINE = "usage-proxy on "


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class ProxyProcess:
    """One `usage-proxy serve` process; its stdout and stderr lines are kept in `lines`."""

    config_path: Path
    port: int
    process: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)  # return codes of the runs that ended
    _ready: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> None:
        self._ready.clear()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(self.config_path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")},
                "ANTHROPIC_API_KEY": UPSTREAM_KEY,
                "USAGE_PROXY_ADMIN_TOKEN": ADMIN_TOKEN,
                "PYTHONUNBUFFERED": "1",
            },
        )
        threading.Thread(target=self._read, args=(self.process,), daemon=True).start()
        if not self._ready.wait(timeout_s):
            self.kill()
            raise AssertionError("proxy did not start:\n" + "".join(self.lines))
        assert self.process.poll() is None, "proxy exited at start:\n" + "".join(self.lines)

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.append(line)
            if line.startswith(READY_LINE):
                self._ready.set()
        self._ready.set()  # exited: start() looks at poll()

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait(self, timeout_s: float = 60.0) -> int:
        assert self.process is not None
        code = await asyncio.to_thread(self.process.wait, timeout_s)
        self.exits.append(code)
        return code

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def log_events(self) -> list[dict]:
        """The JSON log lines (structlog) the process printed."""
        events = []
        for line in self.lines:
            if line.startswith("{"):
                events.append(json.loads(line))
        return events


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
