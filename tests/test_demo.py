"""`usage-proxy serve --demo` as a user runs it: a real process, the SDK, the movable clock."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import anthropic
import pytest
from aiohttp import web

from proxy.__main__ import _freeze_startup_heap

ROOT = Path(__file__).resolve().parent.parent
ALICE_DEMO_KEY = "sk-demo-alice-0000000000000002"
UNBUFFERED = {**os.environ, "PYTHONUNBUFFERED": "1"}  # read the banner while the process runs


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--demo",
            "--port",
            str(port),
            "--config",
            str(ROOT / "config" / "proxy.toml"),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        banner = ""
        while "Move the clock" not in banner:
            line = process.stdout.readline()
            assert line, f"demo exited early: {banner}"
            banner += line
        assert ALICE_DEMO_KEY in banner and "ANTHROPIC_BASE_URL" in banner
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert (tmp_path / "usage-proxy-demo.db").exists()


async def test_demo_serves_the_sdk_and_moves_its_clock(demo: str) -> None:
    client = anthropic.AsyncAnthropic(base_url=demo, api_key=ALICE_DEMO_KEY, max_retries=0)
    raw = await client.messages.with_raw_response.create(
        model="claude-opus-4-8", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    )
    assert (await raw.parse()).content[0].text
    reset_before = raw.headers["x-usage-session-reset"]
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{demo}/admin/v1/clock", json={"advance_s": -5}) as response:
            assert response.status == 400
        async with http.post(f"{demo}/admin/v1/clock", json={"advance_s": 5 * 3600}) as response:
            assert response.status == 200
    raw = await client.messages.with_raw_response.create(
        model="claude-opus-4-8", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-usage-session-reset"] > reset_before  # a new window opened
    assert raw.headers["x-usage-session-remaining"] == raw.headers["x-usage-session-limit"]


def test_mock_upstream_command_serves_the_fake_api(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "mock-upstream", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert "mock upstream on" in process.stdout.readline()
        client = anthropic.Anthropic(
            base_url=f"http://127.0.0.1:{port}", api_key="any", max_retries=0
        )
        message = client.messages.create(
            model="claude-opus-4-8",
            max_tokens=20,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-mock-output-tokens": "7"},
        )
        assert message.usage.output_tokens == 7
    finally:
        process.terminate()
        process.wait(timeout=30)


async def test_serving_freezes_the_start_up_heap_after_freeing_its_garbage() -> None:
    """What `serve` runs once the app has started: the start-up heap leaves the collector's full
    passes (gc.freeze), and garbage made before it is freed, not frozen with it."""

    class Node:
        pass

    gc.unfreeze()
    cycle = Node()
    cycle.itself = cycle  # type: ignore[attr-defined]  # reachable only by a collection
    freed = weakref.ref(cycle)
    del cycle
    try:
        await _freeze_startup_heap(web.Application())
        assert freed() is None
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
