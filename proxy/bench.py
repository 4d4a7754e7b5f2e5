"""`usage-proxy bench`: the proxy's own overhead on this machine, against the mock upstream.

Each part runs in its own process, on free loopback ports: the mock upstream (bench_mock.py: the
mock's answers on a lean server, no artificial delay unless a request scripts one), a bare
pass-through (below: aiohttp, streaming relay chunk by chunk, no auth, no accounting), the real
proxy (`usage-proxy serve` with a generated config: a fresh SQLite store or `--store`, members
with ample quota and extra usage) and the load generator (the proxy's own HTTP/1.1 client,
http1.py, at a fixed concurrency). The same requests go to the mock directly, through the bare
pass-through and through the proxy; the proxy is judged by its ratio to the bare pass-through and
by what it adds to the direct figures, never by absolute times.

CPU comes from /proc/<pid>/stat (utime + stime, every thread), memory from /proc/<pid>/status
(VmRSS). Processes are pinned apart with sched_setaffinity when the machine has two cores or more.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiohttp
from aiohttp import web

from proxy.bench_mock import BenchMock
from proxy.http1 import Client, UpstreamError
from proxy.upstream import HOP_BY_HOP

BENCH_VERSION = 1
MODEL = "claude-sonnet-4-5"
MAX_TOKENS = 4096
OUTPUT_TOKENS = 100  # per answer; a stream carries them in STREAM_DELTAS deltas
STREAM_DELTAS = 20
STREAM_INTERVAL_MS = 5  # the mock's x-mock-delay-ms: before every event after message_start
STREAM_STAGGER_S = (STREAM_DELTAS + 5) * STREAM_INTERVAL_MS / 1000  # one stream's length
HOLD_INTERVAL_MS = 250  # the event interval of the slow streams held open for the memory figure
MEMBERS = 16  # requests go round-robin over this many members' keys
READY_TIMEOUT_S = 60.0
IDLE_S = 0.1  # a process that used no CPU for this long is idle
IDLE_TIMEOUT_S = 10.0  # wait at most this long for the proxy to finish settling after a run
STOP_TIMEOUT_S = 15.0
CLIENT_BUSY_PCT = 90  # a load generator this busy may be what limits the figures
BOUND_CPU_PCT = 80  # a server process that kept its core less busy than this was not the limit
PROFILE_RATE_HZ = 250
PROFILE_TOP = 15  # functions listed per profile table
# --instructions: the proxy under callgrind starts and answers some 40 times slower
VALGRIND_READY_TIMEOUT_S = 300.0

# The targets of the performance issue; the throughput ratio is 0.4 on PostgreSQL.
THROUGHPUT_RATIO_MIN_SQLITE = 0.6
THROUGHPUT_RATIO_MIN_POSTGRES = 0.4
ADDED_LATENCY_MS_P50_MAX = 1.0
ADDED_LATENCY_MS_P99_MAX = 3.0
STREAM_ADDED_TTFB_MS_P99_MAX = 3.0
KB_PER_STREAM_MAX = 40.0
# "No growth across 100,000 requests", read as: under 2 MB per 100,000 requests (RSS moves by a
# few hundred KB with the allocator's arenas and SQLite's page cache even without a leak).
RSS_GROWTH_KB_PER_1000_REQUESTS_MAX = 20.0

# A Claude Code-like request (system prompt, a short conversation); about 1.3 KB of JSON.
SYSTEM_PROMPT = (
    "You are Claude Code, Anthropic's official CLI for Claude. You are an interactive CLI tool "
    "that helps users with software engineering tasks. Use the instructions below and the tools "
    "available to you to assist the user. "
) * 4
CONVERSATION = (
    {"role": "user", "content": "Read proxy/handlers.py and tell me what the relay does."},
    {
        "role": "assistant",
        "content": "The relay forwards the body bytes unchanged and streams the answer back "
        "chunk by chunk while a meter reads the usage from message_start and message_delta.",
    },
    {"role": "user", "content": "Now add a test for a stream that is cut half-way, please."},
)

DEFAULTS = MappingProxyType(  # option: (full run, quick run)
    {
        "requests": (5000, 200),
        "latency_requests": (1000, 50),
        "streams": (5000, 50),
        "open_streams": (1000, 50),
        "hold_s": (20.0, 3.0),
        "warmup_requests": (200, 20),
        "rounds": (5, 2),
    }
)
INSTRUCTION_DEFAULTS = MappingProxyType({"requests": (1000, 20), "streams": (200, 5)})


class BenchError(Exception):
    """A run that cannot go on (a process that did not start, a port that did not answer)."""


# ---------------------------------------------------------------------------------------------
# The command line


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The `bench` subcommand and its options."""
    bench = commands.add_parser(
        "bench",
        help="measure the proxy's own overhead on this machine against the mock upstream",
        description=(
            "Start the mock upstream, a bare aiohttp pass-through and the real proxy (a fresh "
            "SQLite store, or --store), each in its own process, and measure with a built-in "
            "load generator: non-streaming throughput and latency, added latency at "
            "concurrency 1, streaming time to first and last byte, memory per open stream and "
            "RSS growth over a long run. Prints a table; --json FILE writes the figures and "
            "the pass/fail of each target of the performance issue. The exit status is 0 when "
            "every request was answered 200 (targets do not change it)."
        ),
    )
    bench.add_argument(
        "--requests",
        type=_positive_int,
        help="non-streaming requests per target at concurrency 32 (default 5000; quick 200)",
    )
    bench.add_argument("--concurrency", type=_positive_int, default=32, help="default 32")
    bench.add_argument(
        "--latency-requests",
        type=_positive_int,
        help="requests per target at concurrency 1 (default 1000; quick 50)",
    )
    bench.add_argument(
        "--streams",
        type=_positive_int,
        help="streams per target, 20 deltas 5 ms apart, over the rounds (default 5000; quick 50)",
    )
    bench.add_argument("--stream-concurrency", type=_positive_int, default=64, help="default 64")
    bench.add_argument(
        "--open-streams",
        type=_positive_int,
        help="slow streams held open at once for the memory figure (default 1000; quick 50)",
    )
    bench.add_argument(
        "--hold-s",
        type=float,
        help="how long each held stream lasts, in seconds (default 20; quick 3)",
    )
    bench.add_argument(
        "--leak-requests",
        type=_positive_int,
        help="N for the leak check: RSS after N more requests vs after 2N (default --requests)",
    )
    bench.add_argument(
        "--warmup-requests",
        type=_non_negative_int,
        help="requests to each target before measuring, not counted (default 200; quick 20)",
    )
    bench.add_argument(
        "--rounds",
        type=_positive_int,
        help="the non-streaming, concurrency-1 and streaming runs are split into this many "
        "rounds, the targets taking turns in each (in a rotating order), so that a machine "
        "whose speed drifts slows each alike (default 5; quick 2)",
    )
    bench.add_argument(
        "--store",
        help="the proxy's store.url (default: a fresh SQLite file in the run's temporary "
        "folder, where a relative sqlite:/// path also goes); e.g. "
        "postgresql://user@127.0.0.1:5432/bench",
    )
    bench.add_argument(
        "--pricing",
        type=Path,
        default=Path("config/pricing.toml"),
        help="the price table to give the proxy (default: config/pricing.toml)",
    )
    bench.add_argument("--json", type=Path, metavar="FILE", help="write the figures as JSON")
    bench.add_argument(
        "--quick",
        action="store_true",
        help="tiny counts (for tests): figures show the command works, not how fast it is",
    )
    bench.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="after the measured runs, one more non-streaming run of --requests with py-spy "
        "attached to the proxy: collapsed stacks to FILE, the top functions in the table "
        "(needs py-spy: pip install py-spy)",
    )
    bench.add_argument(
        "--instructions",
        action="store_true",
        help="instead of timing: count the proxy's instructions under valgrind's callgrind, per "
        "non-streaming request (--requests, default 1000; quick 20) and per stream (--streams, "
        "one at a time, default 200; quick 5). Repeatable to within 1%% whatever else the "
        "machine does; the kernel's side is not counted (needs valgrind)",
    )
    bench.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    bench.add_argument(
        "--keep", action="store_true", help="keep the temporary folder (config, store, logs)"
    )


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class BenchOptions:
    requests: int
    concurrency: int
    latency_requests: int
    streams: int
    stream_concurrency: int
    open_streams: int
    hold_s: float
    leak_requests: int
    warmup_requests: int
    rounds: int
    store_url: str | None
    pricing: Path
    quick: bool
    pin: bool
    keep: bool
    profile: Path | None = None
    json_path: Path | None = None
    instructions: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchOptions:
        which = 1 if args.quick else 0

        defaults = {**DEFAULTS, **(INSTRUCTION_DEFAULTS if args.instructions else {})}

        def pick(name: str) -> Any:
            value = getattr(args, name)
            return defaults[name][which] if value is None else value

        requests = pick("requests")
        return cls(
            requests=requests,
            concurrency=args.concurrency,
            latency_requests=pick("latency_requests"),
            streams=pick("streams"),
            stream_concurrency=args.stream_concurrency,
            open_streams=pick("open_streams"),
            hold_s=pick("hold_s"),
            leak_requests=args.leak_requests or requests,
            warmup_requests=pick("warmup_requests"),
            rounds=pick("rounds"),
            store_url=args.store,
            pricing=args.pricing,
            quick=args.quick,
            pin=not args.no_pin,
            keep=args.keep,
            profile=args.profile,
            json_path=args.json,
            instructions=args.instructions,
        )

    def json(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        fields["pricing"] = str(self.pricing)
        fields["profile"] = str(self.profile) if self.profile else None
        fields["json_path"] = str(self.json_path) if self.json_path else None
        fields["store_url"] = _redacted(self.store_url) if self.store_url else None
        return fields


def run(args: argparse.Namespace) -> int:
    """`usage-proxy bench`: 0 when every request was answered 200, 1 otherwise, 2 on bad input."""
    options = BenchOptions.from_args(args)
    problem = _check_options(options)
    if problem is not None:
        print(f"usage-proxy: bench: {problem}", file=sys.stderr)
        return 2
    try:
        bench = Bench(options)
        report = bench.count_instructions() if options.instructions else bench.run()
    except BenchError as exc:
        print(f"usage-proxy: bench: {exc}", file=sys.stderr)
        return 1
    print(render_instructions(report) if options.instructions else render_table(report))
    if options.json_path is not None:
        options.json_path.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["all_ok"] else 1


def _check_options(options: BenchOptions) -> str | None:
    if options.store_url is not None and not options.store_url.startswith(
        ("sqlite:///", "postgresql://", "postgres://")
    ):
        return f"--store: must start with sqlite:/// or postgresql://, got {options.store_url!r}"
    if not options.pricing.is_file():
        return f"--pricing: {options.pricing}: no such file (run from the checkout, or name it)"
    if options.hold_s <= 0:
        return f"--hold-s: must be more than 0, got {options.hold_s}"
    if min(options.requests, options.latency_requests, options.streams) < options.rounds:
        return (
            f"--rounds: at most --requests, --latency-requests and --streams, got {options.rounds}"
        )
    for name, path in (("--json", options.json_path), ("--profile", options.profile)):
        if path is not None and not path.parent.is_dir():
            return f"{name}: {path.parent}: no such folder"
    if options.instructions and options.profile is not None:
        return "--instructions counts, --profile samples: one at a time"
    if options.profile is not None and py_spy() is None:
        return "--profile: py-spy is not installed (pip install py-spy)"
    if options.instructions and not (
        shutil.which("valgrind") and shutil.which("callgrind_control")
    ):
        return "--instructions: valgrind is not installed (apt-get install valgrind)"
    if sys.platform != "linux":
        return "needs Linux (/proc for CPU and memory, sched_setaffinity for pinning)"
    return None


def _redacted(url: str) -> str:
    """A store URL without its password."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}@{host}" if user else f"{scheme}{sep}{host}"


# ---------------------------------------------------------------------------------------------
# /proc readings


def cpu_s(pid: int, *, main_thread: bool = False) -> float:
    """User + system CPU seconds of a process, all its threads (or its main thread only),
    from /proc/<pid>/stat (/proc/<pid>/task/<pid>/stat)."""
    where = f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat"
    stat = Path(where).read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # fields from the 3rd (state) on
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    """Resident set size of a process in KB (VmRSS of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"process {pid} has no VmRSS (has it exited?)")


def uses_uvloop(pid: int) -> bool:
    """Whether a process has uvloop's extension loaded (mapped into its memory)."""
    try:
        return "uvloop" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def percentile(values: Sequence[float], pct: float) -> float:
    """The nearest-rank percentile of `values` (0.0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


# ---------------------------------------------------------------------------------------------
# Pinning


@dataclass(frozen=True, slots=True)
class Pinning:
    """Which cores each process may use; empty tuples mean not pinned."""

    target: tuple[int, ...] = ()  # the proxy and the bare pass-through (never loaded together)
    mock: tuple[int, ...] = ()
    load: tuple[int, ...] = ()

    @classmethod
    def plan(cls, cpus: Sequence[int], *, enabled: bool) -> Pinning:
        """The proxy gets a core of its own; the mock and the load generator share the rest
        (each its own core from four cores up)."""
        cpus = sorted(cpus)
        if not enabled or len(cpus) < 2:
            return cls()
        if len(cpus) == 2:
            return cls(target=(cpus[0],), mock=(cpus[1],), load=(cpus[1],))
        return cls(target=(cpus[0],), mock=(cpus[1],), load=tuple(cpus[2:]))

    @property
    def enabled(self) -> bool:
        return bool(self.target)

    def describe(self) -> str:
        if not self.enabled:
            return "not pinned"
        return (
            f"proxy and bare on cpu {_cpus(self.target)}, mock on cpu {_cpus(self.mock)}, "
            f"load generator on cpu {_cpus(self.load)}"
        )

    def json(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "target_cpus": list(self.target),
            "mock_cpus": list(self.mock),
            "load_cpus": list(self.load),
        }


def _cpus(cpus: tuple[int, ...]) -> str:
    return ",".join(str(c) for c in cpus)


def pin(pid: int, cpus: tuple[int, ...]) -> None:
    """Pin a process and each of its threads (affinity is per thread on Linux)."""
    if not cpus:
        return
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task.name), cpus)


def _loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if not use_uvloop:
        return None
    if not _uvloop_installed():
        return None
    return importlib.import_module("uvloop").new_event_loop


def _uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


# ---------------------------------------------------------------------------------------------
# The bare pass-through: the reference the proxy is measured against

BARE_SESSION = web.AppKey("bare_session", aiohttp.ClientSession)


def create_bare_app(upstream_url: str, *, connections_max: int) -> web.Application:
    """A reverse proxy with nothing in it: every request is relayed to `upstream_url` with its
    method, path, query, headers (less hop-by-hop ones) and body; the answer comes back chunk by
    chunk as it arrives. No auth, no parsing, no accounting, no logging."""
    app = web.Application(client_max_size=32 * 1024 * 1024)

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        app[BARE_SESSION] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections_max),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=600),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Content-Type"),
        )
        yield
        await app[BARE_SESSION].close()

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        async with request.app[BARE_SESSION].request(
            request.method, upstream_url + request.rel_url.raw_path_qs, data=body, headers=headers
        ) as upstream:
            response = web.StreamResponse(
                status=upstream.status,
                headers=[
                    (k, v) for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP
                ],
            )
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", relay)
    return app


# ---------------------------------------------------------------------------------------------
# Server processes (mock, bare): each binds port 0 and reports the port it got


def _serve_main(
    role: str,
    conn: Connection,
    cpus: tuple[int, ...],
    use_uvloop: bool,
    upstream_key: str,
    upstream_url: str,
    connections_max: int,
) -> None:
    """A spawned process: serve the mock or the bare pass-through until terminated."""
    if cpus:
        os.sched_setaffinity(0, cpus)

    async def serve() -> None:
        if role == "mock":
            server = await asyncio.get_running_loop().create_server(
                lambda: BenchMock(upstream_key), "127.0.0.1", 0, backlog=4096
            )
            conn.send(server.sockets[0].getsockname()[1])
        else:
            app = create_bare_app(upstream_url, connections_max=connections_max)
            runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
            await site.start()
            conn.send(runner.addresses[0][1])
        await asyncio.Event().wait()  # until terminated

    with asyncio.Runner(loop_factory=_loop_factory(use_uvloop)) as runner:
        runner.run(serve())


# ---------------------------------------------------------------------------------------------
# The load generator (its own process; jobs in, results out through a pipe)


@dataclass(frozen=True, slots=True)
class LoadJob:
    url: str
    keys: tuple[str, ...]  # x-api-key, round-robin
    headers: tuple[tuple[str, str], ...]
    body: bytes
    concurrency: int
    requests: int
    warmup_requests: int = 0
    stream: bool = False
    stagger_s: float = 0.0  # spread the workers' first requests over this long
    cpu_pids: tuple[int, ...] = ()  # read their CPU once the warm-up has settled
    rss_pid: int | None = None  # sample this process's RSS once `requests` streams are open
    rss_deadline_s: float = 0.0  # ... or this long after the start, whichever comes first


@dataclass(slots=True)
class LoadResult:
    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    load_cpu_s: float = 0.0  # the load generator's own CPU over the measured part
    cpu_s_start: dict[int, tuple[float, float]] = field(default_factory=dict)  # process, main
    latency_ms: list[float] = field(default_factory=list)  # to the last byte
    ttfb_ms: list[float] = field(default_factory=list)  # to the first body chunk
    chunks: list[int] = field(default_factory=list)  # body reads per response
    rss_kb_open: int | None = None
    streams_open: int = 0
    warmup_ok: int = 0  # answered 200 during the (uncounted) warm-up

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    def add(self, other: LoadResult) -> None:
        """Pool another run's figures into these (the rounds of one target)."""
        self.requests += other.requests
        for status, n in other.statuses.items():
            self.statuses[status] = self.statuses.get(status, 0) + n
        for name, n in other.errors.items():
            self.errors[name] = self.errors.get(name, 0) + n
        self.wall_s += other.wall_s
        self.load_cpu_s += other.load_cpu_s
        self.latency_ms += other.latency_ms
        self.ttfb_ms += other.ttfb_ms
        self.chunks += other.chunks
        self.warmup_ok += other.warmup_ok


@dataclass(slots=True)
class _Spent:
    """CPU a target used over the rounds of a run (the process, its loop's thread, the mock's),
    its longest wait to go idle, and its CPU per request round by round."""

    all_s: float = 0.0
    main_s: float = 0.0
    mock_s: float = 0.0
    drain_ms: float = 0.0
    ms_per_request_rounds: list[float] = field(default_factory=list)


def _load_main(conn: Connection, cpus: tuple[int, ...], use_uvloop: bool) -> None:
    """A spawned process: run each job it is sent, answer its result; None stops it."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    with asyncio.Runner(loop_factory=_loop_factory(use_uvloop)) as runner:
        while (job := conn.recv()) is not None:
            conn.send(runner.run(run_load(job)))


async def run_load(job: LoadJob) -> LoadResult:
    """Send `job.requests` requests over `job.concurrency` connections (after the warm-up),
    through the proxy's own upstream client (http1.py): about a third of aiohttp's client's
    CPU a request, so that the load generator, which shares a core with the mock on two
    cores, leaves the bare pass-through rather than itself the limit."""
    client = Client(
        job.url, connections_max=job.concurrency, connect_timeout_s=30, read_timeout_s=120
    )
    try:
        warmup = LoadResult()
        if job.warmup_requests:
            await _drive(client, job, job.warmup_requests, warmup, track_open=False)
        result = LoadResult(warmup_ok=warmup.ok)
        for pid in job.cpu_pids:
            await _until_idle(pid)
            result.cpu_s_start[pid] = (cpu_s(pid), cpu_s(pid, main_thread=True))
        cpu_before_s = _own_cpu_s()
        started_s = time.perf_counter()
        await _drive(client, job, job.requests, result, track_open=job.rss_pid is not None)
        result.wall_s = time.perf_counter() - started_s
        result.load_cpu_s = _own_cpu_s() - cpu_before_s
    finally:
        await client.close()
    return result


async def _until_idle(pid: int) -> None:
    """Until a process has used no CPU for IDLE_S (or IDLE_TIMEOUT_S passed)."""
    deadline_s = time.perf_counter() + IDLE_TIMEOUT_S
    before_s = cpu_s(pid)
    while time.perf_counter() < deadline_s:
        await asyncio.sleep(IDLE_S)
        if (now_s := cpu_s(pid)) == before_s:
            return
        before_s = now_s


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


@dataclass(slots=True)
class _OpenStreams:
    open: int = 0
    all_open: asyncio.Event = field(default_factory=asyncio.Event)


async def _drive(
    client: Client,
    job: LoadJob,
    count: int,
    result: LoadResult,
    *,
    track_open: bool,
) -> None:
    tickets = iter(range(count))
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    headers = [(*job.headers, ("x-api-key", key)) for key in job.keys]
    opened = _OpenStreams()

    async def worker(delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        for index in tickets:
            started_s = time.perf_counter()
            first_s = None
            reads = 0
            counted_open = False
            try:
                response = await client.request(  # "": the client's base URL is job.url
                    "POST", "", headers[index % len(headers)], job.body
                )
                try:
                    while await response.next_chunk():
                        if first_s is None:
                            first_s = time.perf_counter()
                            if track_open:
                                counted_open = True
                                opened.open += 1
                                if opened.open >= count:
                                    opened.all_open.set()
                        reads += 1
                finally:
                    response.release()
                status = response.status
            except (UpstreamError, OSError) as exc:
                errors[type(exc).__name__] += 1
                continue
            finally:
                if counted_open:
                    opened.open -= 1
            done_s = time.perf_counter()
            statuses[status] += 1
            result.latency_ms.append((done_s - started_s) * 1000)
            result.ttfb_ms.append(((first_s or done_s) - started_s) * 1000)
            result.chunks.append(reads)

    async def sample_rss() -> None:
        assert job.rss_pid is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(opened.all_open.wait(), job.rss_deadline_s)
        await asyncio.sleep(0.2)  # let the last ones settle into their steady state
        samples = []
        for _ in range(3):
            samples.append((rss_kb(job.rss_pid), opened.open))
            await asyncio.sleep(0.1)
        result.rss_kb_open, result.streams_open = max(samples)

    async with asyncio.TaskGroup() as group:
        workers = min(job.concurrency, count)
        for n in range(workers):
            group.create_task(worker(job.stagger_s * n / workers))
        if track_open:
            group.create_task(sample_rss())
    result.requests += sum(statuses.values()) + sum(errors.values())
    for status, n in statuses.items():
        result.statuses[status] = result.statuses.get(status, 0) + n
    for name, n in errors.items():
        result.errors[name] = result.errors.get(name, 0) + n


# ---------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True, slots=True)
class Target:
    """One place to send requests: the mock itself, the bare pass-through or the proxy."""

    name: str  # direct | bare | proxy
    url: str  # of /v1/messages
    pid: int  # the process whose CPU and memory we read
    keys: tuple[str, ...]


def turns(
    targets: Sequence[Target], requests: int, rounds: int
) -> Iterator[tuple[str, Target, int]]:
    """(label, target, requests) for each target in each round, the order rotated by one every
    round, the requests split as evenly as they go: a machine whose speed drifts during a run
    then slows every target alike."""
    for index in range(rounds):
        share = requests // rounds + (index < requests % rounds)
        for turn in range(len(targets)):
            yield f"round {index + 1}/{rounds}", targets[(index + turn) % len(targets)], share


def request_body(*, stream: bool) -> bytes:
    return json.dumps(
        {
            "model": MODEL,
            "max_tokens": MAX_TOKENS,
            "system": SYSTEM_PROMPT,
            "messages": list(CONVERSATION),
            "stream": stream,
        }
    ).encode()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Bench:
    """One run: start the processes, measure, stop them; `run()` answers the report."""

    def __init__(self, options: BenchOptions) -> None:
        self.options = options
        self.cpus = sorted(os.sched_getaffinity(0))
        self.pinning = Pinning.plan(self.cpus, enabled=options.pin)
        self.upstream_key = "sk-bench-upstream-" + secrets.token_urlsafe(24)
        self.admin_token = secrets.token_urlsafe(32)
        self.member_keys = tuple(
            f"sk-bench-{n:02d}-" + secrets.token_urlsafe(24) for n in range(MEMBERS)
        )
        self.connections_max = (
            max(options.open_streams, options.stream_concurrency, options.concurrency) + 64
        )
        self.requests_to_proxy = 0
        self.proxy_ok = 0  # answered 200 by the proxy: each must be one recorded request
        self._pids: dict[str, int] = {}
        self._context = multiprocessing.get_context("spawn")
        self._load_conn: Connection | None = None

    def run(self) -> dict[str, Any]:
        _raise_open_files_limit(3 * self.options.open_streams + 256)
        with contextlib.ExitStack() as stack:
            folder = self._folder(stack)
            mock_port = self._start_server(stack, "mock", self.pinning.mock, _uvloop_installed())
            mock_url = f"http://127.0.0.1:{mock_port}"
            proxy = self._start_proxy(stack, folder, mock_url)
            proxy_uvloop = uses_uvloop(proxy.pid)
            bare_port = self._start_server(
                stack, "bare", self.pinning.target, proxy_uvloop, upstream_url=mock_url
            )
            self._start_load(stack)
            mock_pid = self._pids["mock"]
            direct = Target("direct", f"{mock_url}/v1/messages", mock_pid, (self.upstream_key,))
            bare = Target(
                "bare",
                f"http://127.0.0.1:{bare_port}/v1/messages",
                self._pids["bare"],
                (self.upstream_key,),
            )
            proxy_target = Target("proxy", f"{proxy.url}/v1/messages", proxy.pid, self.member_keys)
            targets = (direct, bare, proxy_target)
            recorded_before = proxy.requests_recorded()
            report = self._report_head(proxy_uvloop, proxy.store_url)
            self._warm_up(targets)
            report["memory"] = self._memory(bare, proxy_target)
            report["non_streaming"] = self._non_streaming(targets, mock_pid)
            report["latency_c1"] = self._latency_c1(targets)
            report["streaming"] = self._streaming(targets)
            report["memory"]["leak"] = self._leak(proxy_target)
            if self.options.profile is not None:
                report["profile"] = self._profile(proxy_target, self.options.profile)
            self._wait_idle(proxy.pid)
            report["accounting"] = proxy.accounting(
                self.requests_to_proxy, self.proxy_ok, recorded_before, folder
            )
        report["targets"] = targets_of(report)
        report["all_ok"] = all_answered(report)
        return report

    def count_instructions(self) -> dict[str, Any]:
        """`--instructions`: the proxy under valgrind's callgrind, instrumented only while the
        measured requests run (and the settlements after them), one dump for the non-streaming
        requests and one for the streams. Streams go one at a time, so that the proxy, some 40
        times slower under valgrind, still reads each delta on its own."""
        options = self.options
        with contextlib.ExitStack() as stack:
            folder = self._folder(stack)
            mock_port = self._start_server(stack, "mock", self.pinning.mock, _uvloop_installed())
            out = folder / "callgrind.out"  # each dump: callgrind.out.1, .2
            valgrind = ("valgrind", "--tool=callgrind", "--instr-atstart=no")
            proxy = self._start_proxy(
                stack,
                folder,
                f"http://127.0.0.1:{mock_port}",
                under=(*valgrind, f"--callgrind-out-file={out}"),
                ready_timeout_s=VALGRIND_READY_TIMEOUT_S,
            )
            self._start_load(stack)
            target = Target("proxy", f"{proxy.url}/v1/messages", proxy.pid, self.member_keys)
            report = self._report_head(
                uses_uvloop(proxy.pid), proxy.store_url, valgrind_version=_valgrind_version()
            )
            self._warm_up([target])
            runs = (
                ("non_streaming", False, options.requests, options.concurrency),
                ("streaming", True, options.streams, 1),
            )
            for dump, (section, stream, count, concurrency) in enumerate(runs, start=1):
                _callgrind_control(proxy.pid, "--instr=on")
                job = self._job(
                    target,
                    stream=stream,
                    headers=_script_headers(stream=stream),
                    concurrency=concurrency,
                    requests=count,
                    warmup_requests=0,
                )
                result = self._load(f"instructions, {section.replace('_', '-')}", target, job)
                self._wait_idle(proxy.pid)  # its settlements count with it
                _callgrind_control(proxy.pid, "--dump")
                _callgrind_control(proxy.pid, "--instr=off")
                instructions = _callgrind_total(Path(f"{out}.{dump}"))
                report[section] = {
                    **_counts(result),
                    "concurrency": concurrency,
                    "instructions": instructions,
                    "instructions_m_per_request": _round(instructions / count / 1e6, 3),
                }
        report["all_ok"] = all(
            report[section]["ok"] == report[section]["requests"] for section, *_ in runs
        )
        return report

    def _folder(self, stack: contextlib.ExitStack) -> Path:
        """The run's temporary folder (config, store, logs): removed at the end unless kept."""
        folder = Path(tempfile.mkdtemp(prefix="usage-proxy-bench-"))
        if self.options.keep:
            print(f"  config, store and logs in {folder} (kept)", flush=True)
        else:
            stack.callback(shutil.rmtree, folder, ignore_errors=True)
        return folder

    # -- processes --

    def _start_server(
        self,
        stack: contextlib.ExitStack,
        role: str,
        cpus: tuple[int, ...],
        use_uvloop: bool,
        *,
        upstream_url: str = "",
    ) -> int:
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=_serve_main,
            args=(
                role,
                child,
                cpus,
                use_uvloop,
                self.upstream_key,
                upstream_url,
                self.connections_max,
            ),
            name=f"usage-proxy-bench-{role}",
            daemon=True,
        )
        process.start()
        stack.callback(_stop_process, process)
        if not parent.poll(READY_TIMEOUT_S):
            raise BenchError(f"the {role} process did not start within {READY_TIMEOUT_S:.0f} s")
        try:
            port = parent.recv()
        except EOFError:
            raise BenchError(f"the {role} process exited on start") from None
        self._pids[role] = process.pid
        return port

    def _start_load(self, stack: contextlib.ExitStack) -> None:
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=_load_main,
            args=(child, self.pinning.load, _uvloop_installed()),
            name="usage-proxy-bench-load",
            daemon=True,
        )
        process.start()
        stack.callback(_stop_process, process)
        stack.callback(_send_quietly, parent, None)
        self._load_conn = parent
        self._pids["load"] = process.pid

    def _start_proxy(
        self,
        stack: contextlib.ExitStack,
        folder: Path,
        mock_url: str,
        *,
        under: Sequence[str] = (),
        ready_timeout_s: float = READY_TIMEOUT_S,
    ) -> ProxyProcess:
        proxy = ProxyProcess.write(
            folder,
            port=_free_port(),
            upstream_url=mock_url,
            store_url=self.options.store_url,
            pricing=self.options.pricing,
            member_keys=self.member_keys,
            connections_max=self.connections_max,
            upstream_key=self.upstream_key,
            admin_token=self.admin_token,
        )
        stack.callback(proxy.stop)
        proxy.start(self.pinning.target, under=under, ready_timeout_s=ready_timeout_s)
        return proxy

    def _load(self, what: str, target: Target, job: LoadJob) -> LoadResult:
        """Run one job on the load generator; say what runs, for the person waiting."""
        assert self._load_conn is not None
        unit = "streams" if job.stream else "requests"
        print(f"  {what}: {target.name}, {job.requests} {unit}", flush=True)
        self._load_conn.send(job)
        try:
            result: LoadResult = self._load_conn.recv()
        except EOFError:
            raise BenchError(f"the load generator exited during {what}, {target.name}") from None
        if target.name == "proxy":
            self.proxy_ok += result.ok + result.warmup_ok
        return result

    def _job(
        self, target: Target, *, stream: bool, headers: dict[str, str], **kwargs: Any
    ) -> LoadJob:
        base = {"content-type": "application/json", "anthropic-version": "2023-06-01"}
        if kwargs.get("rss_pid") is None:  # open every connection before measuring
            kwargs.setdefault("warmup_requests", kwargs["concurrency"])
        job = LoadJob(
            url=target.url,
            keys=target.keys,
            headers=tuple({**base, **headers}.items()),
            body=request_body(stream=stream),
            stream=stream,
            **kwargs,
        )
        if target.name == "proxy":
            self.requests_to_proxy += job.requests + job.warmup_requests
        return job

    def _wait_idle(self, pid: int) -> float:
        """Wait until a process has used no CPU for 100 ms (the proxy settling what it
        answered); answer how long that took, in ms."""
        started_s = time.perf_counter()
        before_s = cpu_s(pid)
        while time.perf_counter() - started_s < IDLE_TIMEOUT_S:
            time.sleep(IDLE_S)
            now_s = cpu_s(pid)
            if now_s == before_s:
                break
            before_s = now_s
        return max(0.0, (time.perf_counter() - started_s - IDLE_S) * 1000)

    # -- scenarios --

    def _warm_up(self, targets: Sequence[Target]) -> None:
        if not self.options.warmup_requests:
            return
        for target in targets:
            for stream in (False, True):
                result = self._load(
                    "warm-up",
                    target,
                    self._job(
                        target,
                        stream=stream,
                        headers=_script_headers(stream=stream),
                        concurrency=self.options.concurrency,
                        requests=self.options.warmup_requests,
                        warmup_requests=0,
                    ),
                )
                if result.ok != result.requests:
                    raise BenchError(
                        f"{target.name}: warm-up answered {_outcomes(result)} "
                        f"(expected {result.requests} x 200)"
                    )
            self._wait_idle(target.pid)

    def _non_streaming(self, targets: Sequence[Target], mock_pid: int) -> dict[str, Any]:
        options = self.options
        section: dict[str, Any] = {
            "concurrency": options.concurrency,
            "requests": options.requests,
            "rounds": options.rounds,
        }
        pooled = {target.name: LoadResult() for target in targets}
        spent = {target.name: _Spent() for target in targets}
        for label, target, requests in turns(targets, options.requests, options.rounds):
            self._wait_idle(target.pid)
            result = self._load(
                f"non-streaming, {label}",
                target,
                self._job(
                    target,
                    stream=False,
                    headers=_script_headers(stream=False),
                    concurrency=options.concurrency,
                    requests=requests,
                    cpu_pids=(target.pid, mock_pid),
                ),
            )
            drain_ms = self._wait_idle(target.pid)
            used_s = cpu_s(target.pid) - result.cpu_s_start[target.pid][0]
            totals = spent[target.name]
            totals.all_s += used_s
            totals.main_s += cpu_s(target.pid, main_thread=True) - result.cpu_s_start[target.pid][1]
            totals.mock_s += cpu_s(mock_pid) - result.cpu_s_start[mock_pid][0]
            totals.drain_ms = max(totals.drain_ms, drain_ms)
            totals.ms_per_request_rounds.append(1000 * used_s / max(1, result.requests))
            pooled[target.name].add(result)
        for target in targets:
            result = pooled[target.name]
            totals = spent[target.name]
            per_request_ms = 1000 / max(1, result.requests)
            section[target.name] = {
                **_counts(result),
                "requests_per_s": _round(result.requests / result.wall_s if result.wall_s else 0),
                "latency_ms_p50": _round(percentile(result.latency_ms, 50)),
                "latency_ms_p99": _round(percentile(result.latency_ms, 99)),
                "cpu_ms_per_request": _round(totals.all_s * per_request_ms, 3),
                # the event loop's thread; the rest is other threads (checkpoints, to_thread's)
                "main_thread_cpu_ms_per_request": _round(totals.main_s * per_request_ms, 3),
                "mock_cpu_ms_per_request": _round(totals.mock_s * per_request_ms, 3),
                "load_cpu_pct": _round(
                    100 * result.load_cpu_s / result.wall_s if result.wall_s else 0, 1
                ),
                # how busy the measured process kept its core: near 100 means it was the limit
                "cpu_pct": _round(100 * totals.all_s / result.wall_s if result.wall_s else 0, 1),
                "drain_ms": _round(totals.drain_ms, 1),  # the longest wait for it to go idle
                "rss_kb": rss_kb(target.pid),
            }
        bare, proxy = section["bare"], section["proxy"]
        section["ratio_proxy_to_bare_requests_per_s"] = _ratio(
            proxy["requests_per_s"], bare["requests_per_s"]
        )
        section["ratio_proxy_to_bare_cpu_ms_per_request"] = _ratio(
            proxy["cpu_ms_per_request"], bare["cpu_ms_per_request"]
        )
        section["ratio_bare_to_direct_requests_per_s"] = _ratio(
            bare["requests_per_s"], section["direct"]["requests_per_s"]
        )
        # what the throughput ratio would be if each were limited by its own core alone: the
        # steadier figure on a shared machine, where the bare run is rarely CPU-bound
        section["ratio_proxy_to_bare_requests_per_cpu_s"] = _ratio(
            bare["cpu_ms_per_request"], proxy["cpu_ms_per_request"]
        )
        # the same, round by round: how far the machine moved under the pooled figure
        section["ratio_proxy_to_bare_requests_per_cpu_s_rounds"] = [
            _ratio(bare_ms, proxy_ms)
            for bare_ms, proxy_ms in zip(
                spent["bare"].ms_per_request_rounds,
                spent["proxy"].ms_per_request_rounds,
                strict=True,
            )
        ]
        return section

    def _latency_c1(self, targets: Sequence[Target]) -> dict[str, Any]:
        section: dict[str, Any] = {
            "concurrency": 1,
            "requests": self.options.latency_requests,
            "rounds": self.options.rounds,
        }
        pooled = {target.name: LoadResult() for target in targets}
        latency_requests, rounds = self.options.latency_requests, self.options.rounds
        for label, target, requests in turns(targets, latency_requests, rounds):
            self._wait_idle(target.pid)
            pooled[target.name].add(
                self._load(
                    f"concurrency 1, {label}",
                    target,
                    self._job(
                        target,
                        stream=False,
                        headers=_script_headers(stream=False),
                        concurrency=1,
                        requests=requests,
                    ),
                )
            )
        for target in targets:
            result = pooled[target.name]
            section[target.name] = {
                **_counts(result),
                "latency_ms_p50": _round(percentile(result.latency_ms, 50), 3),
                "latency_ms_p99": _round(percentile(result.latency_ms, 99), 3),
            }
        direct = section["direct"]
        for name in ("bare", "proxy"):
            for pct in ("p50", "p99"):
                section[f"{name}_added_ms_{pct}"] = _round(
                    section[name][f"latency_ms_{pct}"] - direct[f"latency_ms_{pct}"], 3
                )
        return section

    def _streaming(self, targets: Sequence[Target]) -> dict[str, Any]:
        options = self.options
        section: dict[str, Any] = {
            "concurrency": options.stream_concurrency,
            "streams": options.streams,
            "rounds": options.rounds,
            "deltas": STREAM_DELTAS,
            "delta_interval_ms": STREAM_INTERVAL_MS,
        }
        pooled = {target.name: LoadResult() for target in targets}
        used_s = dict.fromkeys((target.name for target in targets), 0.0)
        for label, target, streams in turns(targets, options.streams, options.rounds):
            self._wait_idle(target.pid)
            result = self._load(
                f"streaming, {label}",
                target,
                self._job(
                    target,
                    stream=True,
                    headers=_script_headers(stream=True),
                    concurrency=options.stream_concurrency,
                    requests=streams,
                    stagger_s=STREAM_STAGGER_S,  # streams of equal length stay out of step
                    cpu_pids=(target.pid,),
                ),
            )
            self._wait_idle(target.pid)
            used_s[target.name] += cpu_s(target.pid) - result.cpu_s_start[target.pid][0]
            pooled[target.name].add(result)
        for target in targets:
            result = pooled[target.name]
            section[target.name] = {
                **_counts(result),
                "ttfb_ms_p50": _round(percentile(result.ttfb_ms, 50), 3),
                "ttfb_ms_p99": _round(percentile(result.ttfb_ms, 99), 3),
                "ttlb_ms_p50": _round(percentile(result.latency_ms, 50), 3),
                "ttlb_ms_p99": _round(percentile(result.latency_ms, 99), 3),
                "reads_per_stream_p50": percentile(result.chunks, 50),
                "cpu_ms_per_stream": _round(
                    used_s[target.name] * 1000 / max(1, result.requests), 3
                ),
                # how busy it kept its core: near 100, a first byte queues behind the deltas
                "cpu_pct": _round(
                    100 * used_s[target.name] / result.wall_s if result.wall_s else 0, 1
                ),
            }
        direct = section["direct"]
        for name in ("bare", "proxy"):
            for key in ("ttfb_ms_p50", "ttfb_ms_p99", "ttlb_ms_p50", "ttlb_ms_p99"):
                what, _, pct = key.rpartition("_")
                section[f"{name}_added_{what}_{pct}"] = _round(section[name][key] - direct[key], 3)
        return section

    def _memory(self, bare: Target, proxy: Target) -> dict[str, Any]:
        """RSS with `open_streams` slow streams open at once, against RSS just before."""
        options = self.options
        deltas = max(1, round(options.hold_s * 1000 / HOLD_INTERVAL_MS) - 5)
        section: dict[str, Any] = {
            "open_streams": options.open_streams,
            "hold_s": options.hold_s,
        }
        for target in (bare, proxy):
            self._wait_idle(target.pid)
            idle_kb = rss_kb(target.pid)
            result = self._load(
                "memory, held open",
                target,
                self._job(
                    target,
                    stream=True,
                    headers=_script_headers(
                        stream=True, deltas=deltas, interval_ms=HOLD_INTERVAL_MS
                    ),
                    concurrency=options.open_streams,
                    requests=options.open_streams,
                    rss_pid=target.pid,
                    # opened over 40% of a stream's life: a memory figure, not a burst test
                    stagger_s=options.hold_s * 0.4,
                    rss_deadline_s=options.hold_s * 0.8,
                ),
            )
            open_kb = result.rss_kb_open or idle_kb
            section[target.name] = {
                **_counts(result),
                "rss_kb_idle": idle_kb,
                "rss_kb_streams_open": open_kb,
                "streams_open": result.streams_open,
                "kb_per_stream": _round((open_kb - idle_kb) / max(1, result.streams_open), 2),
                "all_open": result.streams_open == options.open_streams,
            }
        return section

    def _leak(self, proxy: Target) -> dict[str, Any]:
        """RSS of the proxy after N more requests and after 2N: the second N should add nothing."""
        n = self.options.leak_requests
        self._wait_idle(proxy.pid)
        samples_kb = [rss_kb(proxy.pid)]
        results = []
        for _ in range(2):
            results.append(
                self._load(
                    "leak check",
                    proxy,
                    self._job(
                        proxy,
                        stream=False,
                        headers=_script_headers(stream=False),
                        concurrency=self.options.concurrency,
                        requests=n,
                    ),
                )
            )
            self._wait_idle(proxy.pid)
            samples_kb.append(rss_kb(proxy.pid))
        growth_kb = samples_kb[2] - samples_kb[1]
        return {
            "requests": 2 * n,
            "ok": sum(r.ok for r in results),
            "failed": sum(r.requests - r.ok for r in results),
            "rss_kb_start": samples_kb[0],
            "rss_kb_after_n": samples_kb[1],
            "rss_kb_after_2n": samples_kb[2],
            "rss_growth_kb": growth_kb,
            "rss_growth_kb_per_1000_requests": _round(growth_kb * 1000 / n, 2),
        }

    def _profile(self, proxy: Target, path: Path) -> dict[str, Any]:
        """One more non-streaming run with py-spy sampling the proxy (not in the figures)."""
        spy_path = py_spy()
        assert spy_path is not None
        self._wait_idle(proxy.pid)
        command = [spy_path, "record", "--pid", str(proxy.pid), "--output", str(path)]
        # --gil: only the thread running Python (waits release the GIL, so they do not count;
        # neither does SQLite's own C code: main_thread_cpu_ms_per_request shows that part)
        command += ["--format", "raw", "--rate", str(PROFILE_RATE_HZ), "--gil"]
        spy = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        pin(spy.pid, self.pinning.mock)  # off the proxy's core
        time.sleep(1.0)  # attached
        if spy.poll() is not None:
            error = spy.stderr.read().decode(errors="replace").strip() if spy.stderr else ""
            return {
                "file": str(path),
                "error": error.splitlines()[-1] if error else "py-spy exited",
            }
        result = self._load(
            "profile",
            proxy,
            self._job(
                proxy,
                stream=False,
                headers=_script_headers(stream=False),
                concurrency=self.options.concurrency,
                requests=self.options.requests,
            ),
        )
        self._wait_idle(proxy.pid)  # settlements are part of each request's cost
        spy.send_signal(signal.SIGINT)
        try:
            spy.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.communicate()
        if not path.is_file():
            return {"file": str(path), "error": "py-spy wrote no profile"}
        return {
            "file": str(path),
            "requests": result.requests,
            "ok": result.ok,
            "failed": result.requests - result.ok,
            "rate_hz": PROFILE_RATE_HZ,
            **summarise_profile(path.read_text()),
        }

    def _report_head(self, proxy_uvloop: bool, store_url: str, **more: str) -> dict[str, Any]:
        """What every report starts with: the version, when, how it ran (and `more` of that),
        and the options."""
        environment = {
            "cores": len(self.cpus),
            "cpu_model": _cpu_model(),
            "load_avg_1m": _round(os.getloadavg()[0], 2),
            "python_version": platform.python_version(),
            "aiohttp_version": aiohttp.__version__,
            "platform": platform.platform(),
            "uvloop_installed": _uvloop_installed(),
            "uvloop_proxy": proxy_uvloop,
            "store": _store_kind(store_url),
            "store_url": _redacted(store_url),
            "store_fresh": self.options.store_url is None,
            # the generated config leaves store.journal as it is by default: leases on
            "store_leases": _store_kind(store_url) == "postgresql",
            "pinning": self.pinning.json(),
            "pinning_text": self.pinning.describe(),
            "load_generator": "http1.py client, one process",
            **more,
        }
        return {
            "bench_version": BENCH_VERSION,
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "environment": environment,
            "options": self.options.json(),
        }


def _callgrind_control(pid: int, command: str) -> None:
    done = subprocess.run(
        ["callgrind_control", command, str(pid)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"callgrind_control {command} failed: {done.stdout}{done.stderr}".strip())


def _callgrind_total(path: Path) -> int:
    """The instructions a callgrind dump counted (its `totals:` line)."""
    try:
        with path.open() as dump:
            for line in dump:
                if line.startswith("totals:"):
                    return int(line.split()[1])
    except OSError as exc:
        raise BenchError(f"no callgrind dump at {path}: {exc}") from None
    raise BenchError(f"{path}: no totals line")


def _valgrind_version() -> str:
    done = subprocess.run(["valgrind", "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip()


def _script_headers(
    *, stream: bool, deltas: int = STREAM_DELTAS, interval_ms: int = STREAM_INTERVAL_MS
) -> dict[str, str]:
    """The mock's script: OUTPUT_TOKENS per answer; streams in `deltas` deltas, an event every
    `interval_ms` (non-streaming answers come at once)."""
    headers = {"x-mock-output-tokens": str(OUTPUT_TOKENS)}
    if stream:
        headers["x-mock-deltas"] = str(deltas)
        headers["x-mock-delay-ms"] = str(interval_ms)
    return headers


def _counts(result: LoadResult) -> dict[str, Any]:
    return {
        "requests": result.requests,
        "ok": result.ok,
        "failed": result.requests - result.ok,
        "statuses": {str(k): v for k, v in sorted(result.statuses.items())},
        "errors": dict(sorted(result.errors.items())),
    }


def _outcomes(result: LoadResult) -> str:
    parts = [f"{n} x {status}" for status, n in sorted(result.statuses.items())]
    parts += [f"{n} x {name}" for name, n in sorted(result.errors.items())]
    return ", ".join(parts) or "nothing"


def _round(value: float, digits: int = 2) -> float:
    return round(float(value), digits)


def _ratio(a: float, b: float) -> float:
    return _round(a / b, 3) if b else 0.0


def _store_kind(url: str) -> str:
    return "postgresql" if url.startswith(("postgresql://", "postgres://")) else "sqlite"


def _raise_open_files_limit(wanted: int) -> None:
    """1,000 open streams need a few thousand descriptors across the processes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < wanted:
            raise BenchError(
                f"the open files limit is {hard}; {wanted} are needed for the open streams "
                "(lower --open-streams or raise ulimit -n)"
            )


def _stop_process(process: multiprocessing.process.BaseProcess) -> None:
    if process.is_alive():
        process.terminate()
        process.join(STOP_TIMEOUT_S)
    if process.is_alive():
        process.kill()
        process.join()


def _send_quietly(conn: Connection, message: Any) -> None:
    with contextlib.suppress(OSError, BrokenPipeError):
        conn.send(message)


# ---------------------------------------------------------------------------------------------
# The real proxy: `usage-proxy serve` with a generated config


@dataclass(slots=True)
class ProxyProcess:
    folder: Path
    port: int
    store_url: str
    env: dict[str, str]
    admin_token: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @classmethod
    def write(
        cls,
        folder: Path,
        *,
        port: int,
        upstream_url: str,
        store_url: str | None,
        pricing: Path,
        member_keys: Sequence[str],
        connections_max: int,
        upstream_key: str,
        admin_token: str,
    ) -> ProxyProcess:
        """proxy.toml, plans.toml (one generous tier), orgs.toml (members with extra usage) and
        a copy of the price table, in `folder`."""
        store_url = store_url or "sqlite:///proxy.db"
        (folder / "pricing.toml").write_bytes(pricing.read_bytes())
        (folder / "plans.toml").write_text(
            "[tiers.bench]\n"
            "session_included_usd = 1000000\n"
            "session_window_hours = 5\n"
            "weekly_included_usd = 1000000\n"
            'included_admission = "any_remaining"\n'
        )
        members = "".join(
            "\n[[orgs.members]]\n"
            f'email = "member{n:02d}@bench.test"\n'
            f'role = "{"primary_owner" if n == 0 else "member"}"\n'
            'tier = "bench"\n'
            f'key = "{key}"\n'
            'extra_usage_consent = "always"\n'
            for n, key in enumerate(member_keys)
        )
        (folder / "orgs.toml").write_text(
            "[[orgs]]\n"
            'id = "bench"\n'
            'plan = "team"\n'
            'timezone = "UTC"\n'
            'extra_usage = "all"\n'
            'monthly_spend_limit_usd = "unlimited"\n'
            "credits_usd = 100000\n" + members
        )
        (folder / "proxy.toml").write_text(
            "[server]\n"
            'host = "127.0.0.1"\n'
            f"port = {port}\n"
            f'public_url = "http://127.0.0.1:{port}"\n'
            "[upstream]\n"
            f'base_url = "{upstream_url}"\n'
            'api_key_env = "USAGE_PROXY_BENCH_UPSTREAM_KEY"\n'
            f"connections_max = {connections_max}\n"
            "[store]\n"
            f"url = {json.dumps(store_url)}\n"
            "[files]\n"
            'pricing = "pricing.toml"\n'
            'plans = "plans.toml"\n'
            'orgs = "orgs.toml"\n'
            "[admin]\n"
            'token_env = "USAGE_PROXY_BENCH_ADMIN_TOKEN"\n'
        )
        package_root = str(Path(__file__).resolve().parent.parent)
        env = {
            **os.environ,
            "USAGE_PROXY_BENCH_UPSTREAM_KEY": upstream_key,
            "USAGE_PROXY_BENCH_ADMIN_TOKEN": admin_token,
            "PYTHONPATH": os.pathsep.join(
                p for p in (package_root, os.environ.get("PYTHONPATH")) if p
            ),
        }
        return cls(folder=folder, port=port, store_url=store_url, env=env, admin_token=admin_token)

    @property
    def config(self) -> Path:
        return self.folder / "proxy.toml"

    def start(
        self,
        cpus: tuple[int, ...],
        *,
        under: Sequence[str] = (),
        ready_timeout_s: float = READY_TIMEOUT_S,
    ) -> None:
        """`usage-proxy serve` (run by `under`, a command such as valgrind's, when given), its
        log lines to proxy.log; answers once /readyz does."""
        with (
            (self.folder / "proxy.log").open("wb") as log,
            (self.folder / "proxy.err").open("wb") as err,
        ):
            self.process = subprocess.Popen(
                [*under, sys.executable, "-m", "proxy", "serve", "--config", str(self.config)],
                cwd=self.folder,
                env=self.env,
                stdout=log,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
        pin(self.pid, cpus)  # before it starts threads; again below for those it started
        deadline_s = time.perf_counter() + ready_timeout_s
        while time.perf_counter() < deadline_s:
            if self.process.poll() is not None:
                raise BenchError(
                    f"the proxy exited with status {self.process.returncode} on start: "
                    f"{self._last_error_line()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as response:
                    if response.status == 200:
                        pin(self.pid, cpus)
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise BenchError(f"the proxy did not answer /readyz within {ready_timeout_s:.0f} s")

    def _last_error_line(self) -> str:
        lines = (self.folder / "proxy.err").read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "(nothing on stderr)"

    def requests_recorded(self) -> int:
        """Posted requests of the bench org this month, from the admin usage report."""
        request = urllib.request.Request(
            f"{self.url}/admin/v1/orgs/bench/usage",
            headers={"authorization": f"Bearer {self.admin_token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return int(json.loads(response.read())["totals"]["requests"])
        except (urllib.error.URLError, OSError, KeyError, ValueError) as exc:
            raise BenchError(f"the proxy's usage report did not answer: {exc}") from None

    def accounting(
        self, sent: int, answered_ok: int, recorded_before: int, folder: Path
    ) -> dict[str, Any]:
        """Did every request the bench sent end in one posted record, with balances that match
        their transfers? (The second part runs `usage-proxy admin verify` after a clean stop.)"""
        recorded = self.requests_recorded() - recorded_before
        self.stop()
        verify = subprocess.run(
            [
                sys.executable,
                "-m",
                "proxy",
                "admin",
                "verify",
                "--config",
                str(self.config),
                "--json",
            ],
            cwd=folder,
            env=self.env,
            capture_output=True,
            timeout=120,
            check=False,
        )
        try:
            verified = json.loads(verify.stdout)
        except ValueError:
            verified = {}
        return {
            "requests_sent": sent,
            "requests_ok": answered_ok,
            "requests_recorded": recorded,
            "pending_reservations": verified.get("pending_reservations"),
            "mismatches": verified.get("mismatches"),
            "verify_ok": verify.returncode == 0,
        }

    def stop(self) -> None:
        """SIGTERM (the proxy drains its settlements), then SIGKILL if it hangs."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# ---------------------------------------------------------------------------------------------
# The profile


def py_spy() -> str | None:
    """py-spy on PATH or beside this Python (a venv's bin/)."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.is_file() else None)


def summarise_profile(collapsed: str) -> dict[str, Any]:
    """py-spy's collapsed stacks (`frame;frame;... count` lines, outermost first) as the share
    of samples per function: where the samples were (self) and under what (inclusive), and
    self time per package (`proxy.<module>`, `aiohttp`, `asyncio`, `sqlite3`, ...)."""
    own: Counter[str] = Counter()
    under: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        functions = [_function(frame) for frame in stack.split(";")]
        own[functions[-1]] += count
        packages[_package(functions[-1])] += count
        for function in set(functions):
            if not _is_plumbing(function):
                under[function] += count

    def shares(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": name, "pct": _round(100 * n / total, 1)}
            for name, n in counter.most_common(PROFILE_TOP)
        ]

    return {
        "samples": total,
        "self_pct": shares(own),
        "inclusive_pct": shares(under),
        "self_pct_by_package": {
            name: _round(100 * n / total, 1) for name, n in packages.most_common()
        }
        if total
        else {},
    }


def _function(frame: str) -> str:
    """`name (path/file.py:123)` -> `name (path/file.py)`: lines of one function together."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rpartition(':')[0] or where.rstrip(')')})"


def _package(function: str) -> str:
    path = function.rpartition(" (")[2].rstrip(")")
    parts = Path(path).with_suffix("").parts
    if not parts:
        return "other"
    if parts[0] == "proxy" and len(parts) > 1:
        return "proxy." + ".".join(parts[1:])
    return parts[0]


def _is_plumbing(function: str) -> bool:
    """Frames every sample sits under (the loop, the process start): no information."""
    return _package(function) in ("asyncio", "runpy", "<frozen runpy>", "threading") or (
        function.startswith(("<module>", "main (", "_serve (", "run_app ("))
    )


# ---------------------------------------------------------------------------------------------
# Targets and the table


def targets_of(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target of the performance issue: the measured value, its limit, pass or fail."""
    postgres = report["environment"]["store"] == "postgresql"
    checks: list[tuple[str, float, str, float]] = [
        (
            "throughput_ratio",
            report["non_streaming"]["ratio_proxy_to_bare_requests_per_s"],
            ">=",
            THROUGHPUT_RATIO_MIN_POSTGRES if postgres else THROUGHPUT_RATIO_MIN_SQLITE,
        ),
        (
            "throughput_ratio_per_cpu_s",
            report["non_streaming"]["ratio_proxy_to_bare_requests_per_cpu_s"],
            ">=",
            THROUGHPUT_RATIO_MIN_POSTGRES if postgres else THROUGHPUT_RATIO_MIN_SQLITE,
        ),
        (
            "added_latency_ms_p50",
            report["latency_c1"]["proxy_added_ms_p50"],
            "<",
            ADDED_LATENCY_MS_P50_MAX,
        ),
        (
            "added_latency_ms_p99",
            report["latency_c1"]["proxy_added_ms_p99"],
            "<",
            ADDED_LATENCY_MS_P99_MAX,
        ),
        (
            "stream_added_ttfb_ms_p99",
            report["streaming"]["proxy_added_ttfb_ms_p99"],
            "<",
            STREAM_ADDED_TTFB_MS_P99_MAX,
        ),
        ("kb_per_stream", report["memory"]["proxy"]["kb_per_stream"], "<", KB_PER_STREAM_MAX),
        (
            "rss_growth_kb_per_1000_requests",
            report["memory"]["leak"]["rss_growth_kb_per_1000_requests"],
            "<",
            RSS_GROWTH_KB_PER_1000_REQUESTS_MAX,
        ),
    ]
    targets = {
        name: {
            "value": value,
            "rule": rule,
            "limit": limit,
            "pass": value >= limit if rule == ">=" else value < limit,
        }
        for name, value, rule, limit in checks
    }
    if not report["memory"]["proxy"]["all_open"]:  # a figure over fewer streams proves nothing
        targets["kb_per_stream"]["pass"] = False
    return targets


def all_answered(report: dict[str, Any]) -> bool:
    """Every measured request answered 200, and the proxy recorded every one it was sent."""
    sections = [
        report["non_streaming"],
        report["latency_c1"],
        report["streaming"],
    ]
    parts = [s[name] for s in sections for name in ("direct", "bare", "proxy")]
    parts += [report["memory"]["bare"], report["memory"]["proxy"], report["memory"]["leak"]]
    accounting = report["accounting"]
    return (
        all(part["failed"] == 0 for part in parts)
        and accounting["requests_recorded"] == accounting["requests_ok"]
        and accounting["verify_ok"]
    )


def render_instructions(report: dict[str, Any]) -> str:
    """`--instructions`' report for a person."""
    env, ns, st = report["environment"], report["non_streaming"], report["streaming"]
    lines = [
        "usage-proxy bench --instructions: the proxy under valgrind's callgrind "
        f"({env['valgrind_version']})",
        *_how_it_ran(report),
        "",
        f"  non-streaming, concurrency {ns['concurrency']}, {ns['requests']} requests: "
        f"{ns['instructions_m_per_request']:.3f} M instructions a request",
        f"  streaming, {STREAM_DELTAS} deltas {STREAM_INTERVAL_MS} ms apart, one at a time, "
        f"{st['requests']} streams: {st['instructions_m_per_request']:.3f} M instructions a stream",
        "",
        "(user space only: what the kernel does in each system call is not counted; the "
        "settlements that follow the answers are)",
    ]
    for name, section in (("non-streaming", ns), ("streaming", st)):
        if section["ok"] != section["requests"]:
            lines.append(f"FAILED: {name}: {section['statuses']} {section['errors']}")
    return "\n".join(lines)


def _how_it_ran(report: dict[str, Any]) -> list[str]:
    """The versions, the loop and the store; and whether it was a quick run."""
    env = report["environment"]
    uvloop = (
        "yes"
        if env["uvloop_proxy"]
        else ("installed, not used" if env["uvloop_installed"] else "no")
    )
    lines = [
        f"Python {env['python_version']}, aiohttp {env['aiohttp_version']}, uvloop in the "
        f"proxy: {uvloop}, store: {env['store']} "
        f"({'a fresh file' if env['store_fresh'] else env['store_url']}"
        f"{', leases on' if env.get('store_leases') else ''})"
    ]
    if report["options"]["quick"]:
        lines.append("QUICK RUN: tiny counts; the figures show the command works, not its speed")
    return lines


def render_table(report: dict[str, Any]) -> str:
    """The report for a person: how it ran, the figures, the targets."""
    env, ns, c1, st, mem = (
        report["environment"],
        report["non_streaming"],
        report["latency_c1"],
        report["streaming"],
        report["memory"],
    )
    lines = [
        f"usage-proxy bench: {env['cores']} cores ({env['cpu_model']}), load average "
        f"{env['load_avg_1m']} at start; {env['pinning_text']}",
        *_how_it_ran(report),
        "",
        f"non-streaming, concurrency {ns['concurrency']}, {ns['requests']} requests each "
        f"in {ns['rounds']} rounds, the targets taking turns",
        f"  {'':<16}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'CPU ms/req':>12}{'loop':>8}"
        f"{'client CPU':>12}",
    ]
    for name in ("direct", "bare", "proxy"):
        row = ns[name]
        lines.append(
            f"  {name:<16}{row['requests_per_s']:>9.0f}{row['latency_ms_p50']:>9.2f}"
            f"{row['latency_ms_p99']:>9.2f}{row['cpu_ms_per_request']:>12.3f}"
            f"{row['main_thread_cpu_ms_per_request']:>8.3f}{row['load_cpu_pct']:>11.0f}%"
        )
    lines.append(
        f"  {'proxy / bare':<16}{ns['ratio_proxy_to_bare_requests_per_s']:>9.3f}"
        f"{'':>18}{ns['ratio_proxy_to_bare_cpu_ms_per_request']:>12.2f}"
    )
    lines.append(
        f"  requests per CPU second, proxy / bare: {ns['ratio_proxy_to_bare_requests_per_cpu_s']}"
        f"; cores kept busy: direct (mock) {ns['direct']['cpu_pct']:.0f}%, bare "
        f"{ns['bare']['cpu_pct']:.0f}%, proxy {ns['proxy']['cpu_pct']:.0f}%"
    )
    lines.append(
        "  the same ratio round by round: "
        + ", ".join(f"{r:.3f}" for r in ns["ratio_proxy_to_bare_requests_per_cpu_s_rounds"])
    )
    lines.append(
        "  (CPU: of the process measured, every thread; direct: the mock's; loop: its event "
        "loop's thread alone; client CPU: the load generator's share of one core)"
    )
    lines += [
        "",
        f"added latency, concurrency 1, {c1['requests']} requests each in {c1['rounds']} rounds "
        "(p50/p99 of each minus direct's)",
        f"  {'':<16}{'p50 ms':>9}{'p99 ms':>9}",
        f"  {'direct':<16}{c1['direct']['latency_ms_p50']:>9.3f}{c1['direct']['latency_ms_p99']:>9.3f}",
    ]
    for name in ("bare", "proxy"):
        lines.append(
            f"  {name + ' added':<16}{c1[f'{name}_added_ms_p50']:>9.3f}"
            f"{c1[f'{name}_added_ms_p99']:>9.3f}"
        )
    lines += [
        "",
        f"streaming, {st['deltas']} deltas {st['delta_interval_ms']} ms apart, concurrency "
        f"{st['concurrency']}, {st['streams']} streams each in {st['rounds']} rounds",
        f"  {'':<16}{'TTFB p50':>10}{'TTFB p99':>10}{'last p50':>10}{'last p99':>10}"
        f"{'reads':>7}{'CPU ms':>9}{'busy':>7}",
    ]
    d = st["direct"]
    lines.append(
        f"  {'direct':<16}{d['ttfb_ms_p50']:>10.2f}{d['ttfb_ms_p99']:>10.2f}"
        f"{d['ttlb_ms_p50']:>10.2f}{d['ttlb_ms_p99']:>10.2f}{d['reads_per_stream_p50']:>7}"
        f"{d['cpu_ms_per_stream']:>9.3f}{d['cpu_pct']:>6.0f}%"
    )
    for name in ("bare", "proxy"):
        lines.append(
            f"  {name + ' added':<16}{st[f'{name}_added_ttfb_ms_p50']:>10.2f}"
            f"{st[f'{name}_added_ttfb_ms_p99']:>10.2f}{st[f'{name}_added_ttlb_ms_p50']:>10.2f}"
            f"{st[f'{name}_added_ttlb_ms_p99']:>10.2f}{st[name]['reads_per_stream_p50']:>7}"
            f"{st[name]['cpu_ms_per_stream']:>9.3f}{st[name]['cpu_pct']:>6.0f}%"
        )
    lines.append(
        "  (CPU ms: a stream's, of the process measured, direct's the mock's; busy: how much of "
        "its core it kept busy: near 100%, first bytes queue behind the other streams' deltas)"
    )
    lines += ["", f"memory, {mem['open_streams']} slow streams open at once"]
    for name in ("bare", "proxy"):
        m = mem[name]
        lines.append(
            f"  {name:<16}idle {m['rss_kb_idle']:,} KB, with {m['streams_open']} open "
            f"{m['rss_kb_streams_open']:,} KB: {m['kb_per_stream']:.1f} KB per stream"
        )
    leak = mem["leak"]
    lines.append(
        f"  {'proxy RSS':<16}{leak['rss_kb_start']:,} KB, after {leak['requests'] // 2} more "
        f"requests {leak['rss_kb_after_n']:,} KB, after {leak['requests']} "
        f"{leak['rss_kb_after_2n']:,} KB: {leak['rss_growth_kb_per_1000_requests']:+.1f} KB per "
        "1000 requests"
    )
    if "profile" in report:
        lines += ["", *_profile_lines(report["profile"])]
    acc = report["accounting"]
    lines += [
        "",
        f"accounting: {acc['requests_recorded']} recorded of the {acc['requests_ok']} requests "
        f"the proxy answered 200 ({acc['requests_sent']} sent); admin verify: "
        f"pending_reservations {acc['pending_reservations']}, "
        f"mismatches {acc['mismatches']}",
        "",
        "targets",
    ]
    for name, target in report["targets"].items():
        lines.append(
            f"  {name:<34}{target['value']:>10} {target['rule']} {target['limit']:<6}"
            f"{'pass' if target['pass'] else 'FAIL'}"
        )
    if ns["bare"]["cpu_pct"] < BOUND_CPU_PCT:
        lines.append(
            f"note: the bare pass-through kept its core only {ns['bare']['cpu_pct']:.0f}% busy, so "
            "something else (the mock, the client, other work on the machine) limited its "
            "throughput, and the throughput ratio flatters the proxy; the CPU ratio "
            f"({ns['ratio_proxy_to_bare_requests_per_cpu_s']}) does not depend on that"
        )
    if st["bare_added_ttfb_ms_p99"] >= STREAM_ADDED_TTFB_MS_P99_MAX:
        lines.append(
            f"note: the bare pass-through itself added {st['bare_added_ttfb_ms_p99']:.2f} ms to "
            f"the streams' TTFB p99, past the {STREAM_ADDED_TTFB_MS_P99_MAX:g} ms target: at this "
            "load a relay's first bytes queue behind the other streams on its one core, so read "
            f"the proxy's {st['proxy_added_ttfb_ms_p99']:.2f} ms against the bare's"
        )
    busy = [n for n in ("direct", "bare", "proxy") if ns[n]["load_cpu_pct"] >= CLIENT_BUSY_PCT]
    if busy:
        lines.append(
            f"note: the load generator was {CLIENT_BUSY_PCT}%+ busy for {', '.join(busy)}: those "
            "figures may be the client's limit rather than the server's"
        )
    if not report["all_ok"]:
        lines.append("SOME REQUESTS FAILED or went unrecorded: see the JSON's statuses and errors")
    return "\n".join(lines)


def _profile_lines(profile: dict[str, Any]) -> list[str]:
    if "error" in profile:
        return [f"profile: py-spy failed: {profile['error']}"]
    lines = [
        f"profile of the proxy (py-spy --gil: where Python held the GIL), "
        f"{profile['requests']} non-streaming requests, {profile['samples']} samples at "
        f"{profile['rate_hz']} Hz (collapsed stacks: {profile['file']})",
        "  self time by package: "
        + ", ".join(
            f"{name} {pct}%" for name, pct in list(profile["self_pct_by_package"].items())[:12]
        ),
        "  where the samples were (self):",
    ]
    lines += [f"    {row['pct']:5.1f}%  {row['function']}" for row in profile["self_pct"][:10]]
    lines.append("  under what (inclusive):")
    lines += [f"    {row['pct']:5.1f}%  {row['function']}" for row in profile["inclusive_pct"][:12]]
    return lines
