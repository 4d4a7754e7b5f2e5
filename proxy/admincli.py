"""`usage-proxy admin ...`: the admin API from the command line.

Against a running proxy (`--url`, with the operator token or an owner's key), or with
`--config FILE`: then the proxy app is started in this process on a loopback port and the same
API is called, so both ways run exactly the code of the HTTP API (no second implementation).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from proxy.app import create_app
from proxy.logs import configure_logging
from proxy.settings import load_settings

DEFAULT_URL = "http://127.0.0.1:8787"
Request = tuple[str, str, dict[str, Any] | None]  # method, path (with query), JSON body


def add_commands(admin: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get("USAGE_PROXY_URL", DEFAULT_URL),
        help=f"a running proxy (default: $USAGE_PROXY_URL or {DEFAULT_URL})",
    )
    common.add_argument(
        "--token",
        default=os.environ.get("USAGE_PROXY_ADMIN_TOKEN"),
        help="operator token or an owner's key (default: $USAGE_PROXY_ADMIN_TOKEN)",
    )
    common.add_argument(
        "--config", type=Path, help="instead of --url: run the API in this process on this config"
    )
    common.add_argument("--json", action="store_true", help="print the JSON answer")

    def leaf(parent: argparse._SubParsersAction, name: str, text: str) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=text, parents=[common])

    org = admin.add_parser("org", help="organisations").add_subparsers(dest="verb", required=True)
    p = leaf(org, "create", "create an organisation (operator)")
    p.add_argument("org")
    p.add_argument("--plan", required=True, choices=("team", "enterprise", "max"))
    p.add_argument("--timezone", default="UTC")
    leaf(org, "show", "settings, balance and members").add_argument("org")
    p = leaf(org, "set", "change extra usage, spend limit, auto-reload, webhook")
    p.add_argument("org")
    p.add_argument("--extra-usage", help='"off", "all" or emails separated by commas')
    p.add_argument("--limit", help='monthly spend limit in USD, or "unlimited"')
    p.add_argument("--auto-reload", help='THRESHOLD:AMOUNT in USD, or "off"')
    p.add_argument("--reservation", choices=("worst_case", "expected"))
    p.add_argument("--webhook", help='URL,SECRET_ENV or "off"')
    p.add_argument("--timezone")

    member = admin.add_parser("member", help="seats").add_subparsers(dest="verb", required=True)
    for verb, text in (("add", "add a member (prints the key once)"), ("set", "change a member")):
        p = leaf(member, verb, text)
        p.add_argument("org")
        p.add_argument("email")
        p.add_argument("--role", choices=("primary_owner", "owner", "member"))
        p.add_argument("--tier")
        p.add_argument("--extra-usage", choices=("on", "off"))
        p.add_argument(
            "--limit", help='Enterprise: monthly limit in USD, or "none" for the tier\'s'
        )
        p.add_argument("--consent", choices=("ask", "always"))
    p = leaf(member, "remove", "remove a member (their keys stop working)")
    p.add_argument("org")
    p.add_argument("email")

    key = admin.add_parser("key", help="member keys").add_subparsers(dest="verb", required=True)
    p = leaf(key, "issue", "a new key for a member (printed once)")
    p.add_argument("org")
    p.add_argument("email")
    leaf(key, "revoke", "revoke a key by its prefix").add_argument("prefix")
    p = leaf(key, "list", "a member's keys, by prefix")
    p.add_argument("org")
    p.add_argument("email")

    p = leaf(admin, "credits", "buy prepaid credits (idempotent)")
    p.add_argument("org")
    p.add_argument("amount_usd")
    p.add_argument("--idempotency-key", required=True)
    p = leaf(admin, "tier-limit", "Enterprise: a seat tier's monthly limit")
    p.add_argument("org")
    p.add_argument("tier")
    p.add_argument("limit", help='USD, or "unlimited"')
    p = leaf(admin, "usage", "usage report")
    p.add_argument("org")
    p.add_argument("--from", dest="from_")
    p.add_argument("--to")
    p.add_argument("--group-by", choices=("member", "model", "day"), default="member")
    leaf(admin, "alerts", "alerts that fired").add_argument("org")
    p = leaf(admin, "statement", "a month's statement")
    p.add_argument("org")
    p.add_argument("month", help="YYYY-MM")
    p.add_argument("--csv", action="store_true")


def request_for(args: argparse.Namespace) -> Request:
    """The API call a command stands for."""
    command, verb = args.admin_command, getattr(args, "verb", None)
    org = f"/admin/v1/orgs/{getattr(args, 'org', '')}"
    if command == "org" and verb == "create":
        return (
            "POST",
            "/admin/v1/orgs",
            {"id": args.org, "plan": args.plan, "timezone": args.timezone},
        )
    if command == "org" and verb == "show":
        return "GET", org, None
    if command == "org" and verb == "set":
        body: dict[str, Any] = {}
        if args.extra_usage is not None:
            body["extra_usage"] = (
                args.extra_usage
                if args.extra_usage in ("off", "all")
                else [e.strip() for e in args.extra_usage.split(",")]
            )
        if args.limit is not None:
            body["monthly_spend_limit_usd"] = args.limit
        if args.auto_reload is not None:
            threshold, _, amount = args.auto_reload.partition(":")
            body["auto_reload"] = (
                "off"
                if args.auto_reload == "off"
                else {"threshold_usd": threshold, "amount_usd": amount}
            )
        if args.webhook is not None:
            url, _, secret_env = args.webhook.partition(",")
            body["webhook"] = (
                "off" if args.webhook == "off" else {"url": url, "secret_env": secret_env}
            )
        for name in ("reservation", "timezone"):
            if getattr(args, name) is not None:
                body[name] = getattr(args, name)
        return "PATCH", org, body
    if command == "member":
        path = f"{org}/members"
        if verb == "remove":
            return "DELETE", f"{path}/{args.email}", None
        body = {}
        for option, name in (
            ("role", "role"),
            ("tier", "tier"),
            ("consent", "extra_usage_consent"),
        ):
            if getattr(args, option) is not None:
                body[name] = getattr(args, option)
        if args.extra_usage is not None:
            body["extra_usage"] = args.extra_usage == "on"
        if args.limit is not None:
            body["monthly_spend_limit_usd"] = None if args.limit == "none" else args.limit
        if verb == "add":
            return "POST", path, {"email": args.email, **body}
        return "PATCH", f"{path}/{args.email}", body
    if command == "key":
        if verb == "issue":
            return "POST", f"{org}/members/{args.email}/keys", None
        if verb == "list":
            return "GET", f"{org}/members/{args.email}/keys", None
        return "DELETE", f"/admin/v1/keys/{args.prefix}", None
    if command == "credits":
        return (
            "POST",
            f"{org}/credits",
            {"amount_usd": args.amount_usd, "idempotency_key": args.idempotency_key},
        )
    if command == "tier-limit":
        return "PUT", f"{org}/tiers/{args.tier}/limit", {"monthly_spend_limit_usd": args.limit}
    if command == "usage":
        query = [f"group_by={args.group_by}"] + [
            f"{name}={value}" for name, value in (("from", args.from_), ("to", args.to)) if value
        ]
        return "GET", f"{org}/usage?{'&'.join(query)}", None
    if command == "alerts":
        return "GET", f"{org}/alerts", None
    if command == "statement":
        return "GET", f"{org}/statements/{args.month}{'?format=csv' if args.csv else ''}", None
    raise ValueError(f"no such admin command: {command} {verb}")


async def run(args: argparse.Namespace) -> int:
    method, path, body = request_for(args)
    if args.config is None:
        if not args.token:
            print("usage-proxy: --token is required (or set USAGE_PROXY_ADMIN_TOKEN)")
            return 2
        return await _call(args.url, args.token, method, path, body, as_json=args.json)
    # In process: the same API on a loopback port, authorised by a one-off operator token.
    configure_logging("warning", stream=sys.stderr)  # stdout is the command's answer
    token = secrets.token_urlsafe(32)
    settings = dataclasses.replace(load_settings(args.config), admin_token=token)
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        return await _call(f"http://127.0.0.1:{port}", token, method, path, body, as_json=args.json)
    finally:
        await runner.cleanup()


async def _call(
    url: str, token: str, method: str, path: str, body: dict[str, Any] | None, *, as_json: bool
) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method, url.rstrip("/") + path, json=body, headers={"authorization": f"Bearer {token}"}
        ) as response,
    ):
        if response.content_type == "text/csv":
            print(await response.text(), end="")
            return 0
        answer = await response.json()
    if response.status >= 400:
        print(f"usage-proxy: {answer['error']['message']}")
        return 1
    print(json.dumps(answer, indent=2) if as_json else render(answer))
    return 0


def render(answer: dict[str, Any]) -> str:
    """A JSON answer for a person: scalars as `name: value`, lists of objects as tables."""
    lines: list[str] = []
    tables: list[tuple[str, list[dict[str, Any]]]] = []
    for name, value in answer.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables.append((name, value))
        elif isinstance(value, dict):
            lines += [f"{name}.{k}: {_cell(v)}" for k, v in value.items()]
        else:
            lines.append(f"{name}: {_cell(value)}")
    for name, rows in tables:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        widths = [max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in columns]
        lines += [
            "",
            f"{name}:",
            "  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)),
        ]
        lines += [
            "  " + "  ".join(_cell(r.get(c)).ljust(w) for c, w in zip(columns, widths, strict=True))
            for r in rows
        ]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def main(args: argparse.Namespace) -> int:
    return asyncio.run(run(args))
