"""The command line: serve | mock-upstream | hash-key | continue | usage | admin | bench."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import socket
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from proxy import admincli, bench
from proxy.admincli import DEFAULT_URL
from proxy.app import create_app, front_runner
from proxy.auth import hash_key
from proxy.clock import OffsetClock, SystemClock
from proxy.errors import ConfigError
from proxy.logs import configure_logging
from proxy.mock_upstream import create_mock_app
from proxy.orgfile import load_orgs
from proxy.settings import (
    SQLITE_URL_PREFIX,
    STORE_URL_PREFIXES,
    ServerSettings,
    Settings,
    StoreSettings,
    load_settings,
)
from proxy.store import open_store
from proxy.store.base import StoreUnavailable
from proxy.store.move import MoveRefused, move_store

DEFAULT_CONFIG = Path("config/proxy.toml")
DEMO_UPSTREAM_KEY = "sk-demo-upstream-key"
DEMO_MEMBER_KEY = "sk-demo-alice-0000000000000002"  # alice in config/demo-orgs.toml


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="usage-proxy",
        description="A metering reverse proxy for Anthropic's Messages API.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help="proxy.toml (default: config/proxy.toml)",
    )
    serve.add_argument(
        "--demo",
        action="store_true",
        help="use the built-in mock upstream, a demo SQLite file and a demo org",
    )
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")

    mock = commands.add_parser("mock-upstream", help="run only the fake Anthropic API")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=8788)
    mock.add_argument("--api-key", help="refuse requests whose x-api-key differs")

    hashing = commands.add_parser("hash-key", help="print the SHA-256 of a key for orgs.toml")
    hashing.add_argument("key")

    for name, text in (
        ("continue", "opt in to extra usage until your blocked window resets"),
        ("usage", "your windows, extra usage state and month-to-date spend"),
    ):
        member = commands.add_parser(name, help=text)
        member.add_argument(
            "--key",
            default=os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("ANTHROPIC_AUTH_TOKEN"),
            help="your usage-proxy key (default: $ANTHROPIC_API_KEY, else $ANTHROPIC_AUTH_TOKEN, "
            "as Claude Code reads them)",
        )
        member.add_argument(
            "--url",
            default=os.environ.get("ANTHROPIC_BASE_URL", DEFAULT_URL),
            help=f"the proxy (default: $ANTHROPIC_BASE_URL or {DEFAULT_URL})",
        )
        member.add_argument("--json", action="store_true", help="print the JSON answer")

    admin = commands.add_parser("admin", help="operator commands")
    admin_commands = admin.add_subparsers(dest="admin_command", required=True)
    verify = admin_commands.add_parser(
        "verify", help="check that every balance equals the sum of its transfers"
    )
    verify.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    verify.add_argument("--json", action="store_true", help="print JSON")
    move = admin_commands.add_parser(
        "migrate-store",
        help="copy a whole store into an empty one (e.g. SQLite to PostgreSQL), then compare",
        description="Stop the proxy first. Copies every table in one transaction of the "
        "target, then compares row counts, balances and transfers and verifies the target.",
    )
    move.add_argument("--from", dest="source", required=True, help="store URL to copy")
    move.add_argument("--to", dest="target", required=True, help="empty store URL to fill")
    move.add_argument("--json", action="store_true", help="print JSON")
    admincli.add_commands(admin_commands)

    bench.add_parser(commands)

    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "mock-upstream":
            configure_logging()
            web.run_app(
                create_mock_app(api_key=args.api_key),
                loop=_event_loop(),
                host=args.host,
                port=args.port,
                print=lambda _: print(f"mock upstream on http://{args.host}:{args.port}"),
            )
            return 0
        if args.command == "hash-key":
            print(hash_key(args.key))
            return 0
        if args.command == "continue":
            return _member_call(args, "POST", "/v1/extra-usage/continue")
        if args.command == "usage":
            return _member_call(args, "GET", "/v1/usage")
        if args.command == "admin" and args.admin_command == "verify":
            return asyncio.run(_verify(load_settings(args.config), as_json=args.json))
        if args.command == "admin" and args.admin_command == "migrate-store":
            problem = _store_url_problem(
                "--from", args.source, must_exist=True
            ) or _store_url_problem("--to", args.target, must_exist=False)
            if problem:
                print(f"usage-proxy: {problem}", file=sys.stderr)
                return 2
            return asyncio.run(_migrate_store(args.source, args.target, as_json=args.json))
        if args.command == "admin":
            return admincli.main(args)
        if args.command == "bench":
            return bench.run(args)
    except ConfigError as exc:
        print(f"usage-proxy: config error: {exc}", file=sys.stderr)
        return 2
    except StoreUnavailable as exc:
        print(f"usage-proxy: store error: {exc}", file=sys.stderr)
        return 1
    return 2


async def _verify(settings: Settings, *, as_json: bool) -> int:
    """Recompute balances from transfers; exit 0 only when all agree and nothing is stale."""
    store = await open_store(settings.store)
    try:
        result = await store.verify(SystemClock().now_s())
    finally:
        await store.close()
    if as_json:
        print(
            json.dumps(
                {
                    "pending_reservations": result.pending_reservations,
                    "mismatches": len(result.mismatches),
                    "details": list(result.mismatches),
                }
            )
        )
    else:
        print(f"pending_reservations: {result.pending_reservations}")
        print(f"mismatches: {len(result.mismatches)}")
        for line in result.mismatches:
            print(f"  {line}")
    return 0 if not result.mismatches and not result.pending_reservations else 1


def _store_url_problem(flag: str, url: str, *, must_exist: bool) -> str | None:
    if not url.startswith(STORE_URL_PREFIXES):
        return f"{flag}: must start with sqlite:/// or postgresql://"
    path = url.removeprefix(SQLITE_URL_PREFIX)
    if must_exist and url.startswith(SQLITE_URL_PREFIX) and not Path(path).is_file():
        return f"{flag}: no such file {path}"
    return None


async def _migrate_store(source_url: str, target_url: str, *, as_json: bool) -> int:
    source = await open_store(StoreSettings(url=source_url))
    try:
        target = await open_store(StoreSettings(url=target_url))
        try:
            report = await move_store(source, target, SystemClock().now_s())  # type: ignore[arg-type]
        finally:
            await target.close()
    except MoveRefused as exc:
        print(f"usage-proxy: migrate-store: {exc}", file=sys.stderr)
        return 1
    finally:
        await source.close()
    if as_json:
        print(
            json.dumps(
                {
                    "ok": report.ok,
                    "rows": {t: {"from": a, "to": b} for t, (a, b) in report.rows.items()},
                    "ledger_equal": report.ledger_equal,
                    "mismatches": len(report.mismatches),
                }
            )
        )
    else:
        for table, (copied, landed) in report.rows.items():
            print(
                f"{table:<12} {copied:>9} -> {landed:<9} {'ok' if copied == landed else 'DIFFERS'}"
            )
        print(f"balances and transfers equal: {'yes' if report.ledger_equal else 'NO'}")
        print(f"mismatches: {len(report.mismatches)}")
    return 0 if report.ok else 1


def _member_call(args: argparse.Namespace, method: str, path: str) -> int:
    """A member's own call to the proxy with their key; print the answer for a person."""
    if not args.key:
        print(
            "usage-proxy: --key is required (or set ANTHROPIC_API_KEY or ANTHROPIC_AUTH_TOKEN)",
            file=sys.stderr,
        )
        return 2
    request = urllib.request.Request(
        args.url.rstrip("/") + path,
        method=method,
        data=b"" if method == "POST" else None,
        headers={"x-api-key": args.key},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        print(json.loads(exc.read())["error"]["message"], file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"usage-proxy: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
    elif "message" in answer:
        print(answer["message"])
    else:
        print(_usage_text(answer))
    return 0


def _usage_text(usage: dict) -> str:
    """GET /v1/usage as a few lines a person reads."""
    member, extra = usage["member"], usage["extra_usage"]
    lines = [f"{member['email']} ({member['org']}, {member['tier']})"]
    for name in ("session", "weekly"):
        window = usage[name]
        if window is not None:
            resets = window["resets_at"] or "opens with your next request"
            lines.append(
                f"  {name:<8} ${window['used_usd']} of ${window['limit_usd']} used, "
                f"${window['remaining_usd']} left; resets {resets}"
            )
    lines.append(
        f"  extra usage: {extra['status']}; this month ${extra['month_spent_usd']} "
        f"(your limit {extra['member_limit_usd']}, org {extra['org_month_spent_usd']} "
        f"of {extra['org_limit_usd']})"
    )
    if extra["balance_usd"] is not None:
        lines.append(f"  prepaid balance: ${extra['balance_usd']}")
    return "\n".join(lines)


def _event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (a dependency on Linux and macOS): the same asyncio API on a
    faster loop; the standard one elsewhere."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _serve(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    server = dataclasses.replace(
        settings.server,
        host=args.host or settings.server.host,
        port=args.port or settings.server.port,
    )
    if args.port and not args.demo and server.public_url.endswith(f":{settings.server.port}"):
        server = dataclasses.replace(server, public_url=f"http://{server.host}:{server.port}")
    settings = dataclasses.replace(settings, server=server)
    configure_logging(settings.server.log_level)
    if args.demo:
        return _serve_demo(settings, args.config)
    if settings.orgs_file is not None:
        load_orgs(
            settings.orgs_file, settings.plans
        )  # fail fast, with file and key, before binding
    _run(create_app(settings), server, lambda: print(f"usage-proxy on {server.public_url}"))
    return 0


def _run(app: web.Application, server: ServerSettings, banner: Callable[[], None]) -> None:
    """Serve until SIGINT or SIGTERM, then stop accepting and let running requests end within
    `server.shutdown_grace_s` (what aiohttp's run_app does, with the lean front: front.py)."""
    app.on_startup.append(_freeze_startup_heap)  # after the cleanup contexts have started
    runner = front_runner(
        app,
        handle_signals=True,  # SIGINT, SIGTERM: raise GracefulExit
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=server.shutdown_grace_s,
    )

    async def serve() -> None:
        try:
            await runner.setup()
            await web.TCPSite(runner, server.host, server.port).start()
            banner()
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    loop = _event_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(serve())
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        main.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(main)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def _freeze_startup_heap(_: web.Application) -> None:
    """Leave what start-up built (modules, classes, price tables, the app) out of the garbage
    collector's full passes: those scanned it all, about 40 ms in which no stream moved; with it
    frozen a full pass takes about 1 ms (measured in the bench). Freed garbage first, so none of
    it is kept for good."""
    gc.collect()
    gc.freeze()


def _serve_demo(settings: Settings, config_path: Path) -> int:
    """The one-command try-out: mock upstream in process, a demo SQLite file, the demo org."""
    mock_sock = socket.socket()
    mock_sock.bind(("127.0.0.1", 0))
    mock_url = f"http://127.0.0.1:{mock_sock.getsockname()[1]}"
    public_url = f"http://{settings.server.host}:{settings.server.port}"
    orgs_file = config_path.parent / "demo-orgs.toml"
    settings = dataclasses.replace(
        settings,
        server=dataclasses.replace(settings.server, public_url=public_url),
        upstream=dataclasses.replace(
            settings.upstream, base_url=mock_url, api_key=DEMO_UPSTREAM_KEY
        ),
        store=dataclasses.replace(
            settings.store, url=f"sqlite:///{Path('usage-proxy-demo.db').resolve()}"
        ),
        orgs_file=orgs_file,
        demo=True,
    )
    load_orgs(orgs_file, settings.plans)  # fail fast on a broken demo file
    app = create_app(settings, clock=OffsetClock())

    async def mock_ctx(_: web.Application) -> AsyncIterator[None]:
        runner = web.AppRunner(create_mock_app(api_key=DEMO_UPSTREAM_KEY), access_log=None)
        await runner.setup()
        await web.SockSite(runner, mock_sock).start()
        yield
        await runner.cleanup()

    app.cleanup_ctx.insert(0, mock_ctx)

    def banner() -> None:
        print(f"usage-proxy demo on {public_url} (mock upstream {mock_url}; nothing real is spent)")
        print(f"store: {settings.store.url}")
        # demo-orgs.toml holds its keys in the clear on purpose: print them for the try-out
        for org in tomllib.loads(orgs_file.read_text())["orgs"]:
            print(f"org {org['id']!r} ({org['plan']}):")
            for m in org["members"]:
                print(f"  {m['email']:<20} {m['role']:<14} {m['tier']:<9} key: {m['key']}")
        print("\nPoint Claude Code at it:")
        print(f"  export ANTHROPIC_BASE_URL={public_url}")
        print(f"  export ANTHROPIC_API_KEY={DEMO_MEMBER_KEY}")
        print("  export CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1")
        print("  claude")
        print(
            f"Move the clock: curl -X POST {public_url}/admin/v1/clock -d '{{\"advance_s\": 18000}}'"
        )

    _run(app, settings.server, banner)
    return 0


if __name__ == "__main__":
    sys.exit(main())
