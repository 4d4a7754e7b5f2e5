"""Shared fixtures: factories for settings and servers on real sockets (no patching)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.app import create_app, front_runner
from proxy.appkeys import STORE, TASKS
from proxy.billing import PaymentProvider
from proxy.clock import FakeClock
from proxy.mock_upstream import create_mock_app
from proxy.settings import Settings, load_settings

# The machine's PostgreSQL (trust auth); tests that need it get a schema of their own on it.
POSTGRES_URL = os.environ.get(
    "USAGE_PROXY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
UPSTREAM_KEY = "sk-ant-test-upstream-key-never-shown"
ADMIN_TOKEN = "test-operator-token-0123456789"

ALICE_KEY = "sk-test-alice-00000000000000001"
BOB_KEY = "sk-test-bob-0000000000000000002"
REVOKED_KEY = "sk-test-revoked-000000000000003"

DEFAULT_ORGS = f"""
[[orgs]]
id = "acme"
plan = "team"
timezone = "UTC"
extra_usage = "all"
credits_usd = 100

[[orgs.members]]
email = "alice@acme.test"
role = "owner"
tier = "standard"
key = ["{ALICE_KEY}", "{REVOKED_KEY}"]

[[orgs.members]]
email = "bob@acme.test"
role = "member"
tier = "standard"
key = "{BOB_KEY}"
"""


ROOT = Path(__file__).resolve().parent.parent
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
            [
                sys.executable,
                "-m",
                "proxy",
                "serve",
                "--config",
                str(self.config_path),
                "--port",
                str(self.port),
            ],
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


@pytest.fixture(autouse=True)
def _no_anthropic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the developer's real ANTHROPIC_* variables."""
    for name in list(os.environ):
        if name.startswith("ANTHROPIC_"):
            monkeypatch.delenv(name)


@asynccontextmanager
async def postgres_schema() -> AsyncIterator[str]:
    """A store URL on a fresh schema of the local PostgreSQL, dropped afterwards. The test is
    skipped when no server answers, unless USAGE_PROXY_REQUIRE_POSTGRES=1 (CI) fails it."""
    try:
        admin = await asyncpg.connect(POSTGRES_URL, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        reason = f"PostgreSQL not reachable at {POSTGRES_URL}: {exc}"
        if os.environ.get("USAGE_PROXY_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason + " (USAGE_PROXY_REQUIRE_POSTGRES=1)")
        pytest.skip(reason)
    schema = f"test_{uuid.uuid4().hex[:16]}"
    await admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{POSTGRES_URL}?search_path={schema}"
    finally:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    async with postgres_schema() as url:
        yield url


@dataclass
class ConfigFactory:
    """Writes a config directory (real pricing and plans, given orgs) and loads it."""

    root: Path
    store_url: str = "sqlite:///proxy.db"

    def write(
        self,
        *,
        upstream_url: str = "http://127.0.0.1:9",
        orgs: str = DEFAULT_ORGS,
        server: str = "",
        upstream: str = "",
        store: str = "",
        tables: str = "",
        plans: str | None = None,
    ) -> Path:
        """`server`, `upstream` and `store` are extra TOML lines for those tables of proxy.toml;
        `tables` adds whole tables."""
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.copy(CONFIG_DIR / "pricing.toml", self.root / "pricing.toml")
        if plans is None:
            shutil.copy(CONFIG_DIR / "plans.toml", self.root / "plans.toml")
        else:
            (self.root / "plans.toml").write_text(plans)
        (self.root / "orgs.toml").write_text(orgs)
        path = self.root / "proxy.toml"
        path.write_text(
            f"[server]\n{server}\n"
            f'[upstream]\nbase_url = "{upstream_url}"\n{upstream}\n'
            f'[store]\nurl = "{self.store_url}"\n{store}\n'
            f'[files]\norgs = "orgs.toml"\n{tables}'
        )
        return path

    def settings(self, **kwargs: object) -> Settings:
        env = {"ANTHROPIC_API_KEY": UPSTREAM_KEY, "USAGE_PROXY_ADMIN_TOKEN": ADMIN_TOKEN}
        return load_settings(self.write(**kwargs), env=env)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests of a module marked `both_stores` run on SQLite and on PostgreSQL."""
    if "store_url" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "both_stores"
    ):
        metafunc.parametrize("store_url", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
async def store_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """The store of the proxy under test: SQLite, unless parametrized (`both_stores`)."""
    if getattr(request, "param", "sqlite") == "postgresql":
        async with postgres_schema() as url:
            yield url
    else:
        yield "sqlite:///proxy.db"


@pytest.fixture
def config(tmp_path: Path, store_url: str) -> ConfigFactory:
    return ConfigFactory(tmp_path / "config", store_url)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def upstream(aiohttp_server: Callable[..., TestServer]) -> TestServer:
    """The mock Messages API on a real socket; it refuses any key but the proxy's."""
    return await aiohttp_server(create_mock_app(api_key=UPSTREAM_KEY))


class ProxyServer(TestServer):
    """aiohttp's TestServer, serving the app as `usage-proxy serve` does: through the lean
    front (front.py) for /v1/messages."""

    async def _make_runner(self, **kwargs: object) -> web.AppRunner:
        return front_runner(self.app, **kwargs)


@pytest.fixture
async def start_proxy(config: ConfigFactory, clock: FakeClock, upstream: TestServer):
    """Start the real app (create_app) against the mock upstream; returns the TestServer.

    After the test, the ledger invariant must hold: every balance and month-to-date figure
    equals the sum of its transfers."""
    started: list[TestServer] = []

    async def start(*, payments: PaymentProvider | None = None, **kwargs: object) -> TestServer:
        kwargs.setdefault("upstream_url", str(upstream.make_url("")).rstrip("/"))
        app: web.Application = create_app(config.settings(**kwargs), clock=clock, payments=payments)
        server = ProxyServer(app)
        started.append(server)
        await server.start_server()  # test servers cancel handlers of gone clients
        return server

    yield start
    for server in started:
        await asyncio.sleep(0.05)  # settlements run just after the response
        verification = await server.app[STORE].verify(clock.now_s())
        await server.close()
        assert verification.mismatches == (), verification.mismatches


async def settled(proxy: TestServer, count: int = 1, timeout_s: float = 5.0):
    """The newest `count` request records once none is pending (settlement runs after relay)."""
    store = proxy.app[STORE]
    for _ in range(int(timeout_s / 0.02)):
        records = await store.recent_requests(count)
        if len(records) == count and all(r.status != "pending" for r in records):
            return records
        await asyncio.sleep(0.02)
    raise AssertionError(f"requests not settled: {await store.recent_requests(count)}")


async def quiet(proxy: TestServer, timeout_s: float = 10.0) -> None:
    """Wait until nothing is left to settle and no background task (settlement, auto-reload,
    webhook) runs but the sweeper."""
    for _ in range(int(timeout_s / 0.02)):
        if proxy.app[TASKS].pending <= 1 and await proxy.app[STORE].pending_count() == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"still busy: {proxy.app[TASKS].pending} tasks")


@pytest.fixture
async def proxy(start_proxy) -> TestServer:
    return await start_proxy()
