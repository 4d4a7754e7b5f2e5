"""Schemathesis fuzzes the admin API from the OpenAPI document it serves, on a real socket.

For every documented operation, sent as the operator:
- explicit cases first (hypothesis's explicit phase, the same every run): the real ids with each
  value of the closed query vocabularies, a valid body sent twice (replays, conflicts), and raw
  junk instead of the body (not JSON, not an object, nested too deep);
- then MAX_EXAMPLES generated cases, derandomized: mostly real ids (org "acme" or "beta", their
  members, a tier, a live key prefix, a month) with schema-valid bodies steered to values the
  parsers accept, and also schema-breaking (negative) data, random ids and random junk bytes.
Every response must be no 5xx and must match the document: a documented status code, a
documented content type, a JSON body valid against the documented schema. Failures are collected
(never shrunk) and reported together, each with the exact request as curl and the response."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import requests
import schemathesis
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import ADMIN_TOKEN

ALICE_KEY = "sk-test-fuzz-alice-000000000000001"
BOB_KEY = "sk-test-fuzz-bob-00000000000000002"
DAVE_KEY = "sk-test-fuzz-dave-00000000000000003"
ORGS = f"""
[[orgs]]
id = "acme"
plan = "team"
extra_usage = "all"
credits_usd = 10

[[orgs.members]]
email = "alice@acme.test"
role = "owner"
tier = "standard"
key = "{ALICE_KEY}"

[[orgs.members]]
email = "bob@acme.test"
role = "member"
tier = "standard"
key = "{BOB_KEY}"

[[orgs]]
id = "beta"
plan = "enterprise"

[[orgs.members]]
email = "dave@beta.test"
role = "owner"
tier = "standard"
key = "{DAVE_KEY}"
"""
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
JSON = {"Content-Type": "application/json"}
# Generated cases per operation (the explicit ones come on top); raise it locally to dig deeper.
MAX_EXAMPLES = int(os.environ.get("USAGE_PROXY_FUZZ_EXAMPLES", "25"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# Real path parameters, one dict per org so that the ids agree with each other; "prefix" is
# filled in with the prefixes of keys issued just before the run.
REAL_PATHS = [
    {
        "org": ["acme"],
        "email": ["alice@acme.test", "bob@acme.test"],
        "tier": ["standard", "premium"],
        "month": ["2026-01", "2025-12"],  # the FakeClock starts on 2026-01-01
    },
    {
        "org": ["beta"],
        "email": ["dave@beta.test"],
        "tier": ["standard", "premium"],
        "month": ["2026-01"],
    },
]
# The closed vocabularies of the query parameters (the document types them as any string).
REAL_QUERY = {
    "format": ["json", "csv"],
    "group_by": ["member", "model", "day"],
    "from": ["2026-01-01", "2025-12-01"],
    "to": ["2026-01-31", "2026-01-01"],
}
# Values the parsers accept for body fields that the document types loosely.
REAL_BODY: dict[str, list[Any]] = {
    "email": ["erin@acme.test", "frank@beta.test", "bob@acme.test"],
    "tier": ["standard", "premium"],
    "timezone": ["UTC", "Europe/Rome", "America/New_York"],
    "extra_usage": ["all", "off", ["bob@acme.test"]],
    "amount_usd": ["1", "2.50", 5],
    "idempotency_key": ["order-1", "order-2"],  # repeats: replays and conflicts
    "webhook": ["off", {"url": "http://127.0.0.1:9/hook", "secret_env": "HOOK_SECRET"}],
}
KEEP = object()  # steer_body: leave the generated value
# A valid body per operation, sent twice in the explicit phase.
GOOD_BODY = {
    "POST /admin/v1/orgs": {"id": "gamma", "plan": "max", "timezone": "Europe/Rome"},
    "PATCH /admin/v1/orgs/{org}": {"reservation": "expected", "monthly_spend_limit_usd": "50"},
    "POST /admin/v1/orgs/{org}/members": {"email": "erin@acme.test", "tier": "premium"},
    "PATCH /admin/v1/orgs/{org}/members/{email}": {"tier": "premium"},
    "PUT /admin/v1/orgs/{org}/tiers/{tier}/limit": {"monthly_spend_limit_usd": 5},
    "POST /admin/v1/orgs/{org}/credits": {"amount_usd": "2.50", "idempotency_key": "order-9"},
}
# Bodies that are not the JSON object the document asks for, sent raw as application/json.
JUNK = [
    b"",
    b"{",
    b"[]",
    b"null",
    b'"x"',
    b"1e999",
    b"NaN",
    b'{"a":',
    b"\xff\xfe",
    b"[" * 5000,  # unterminated and deep
    b"[" * 100_000 + b"]" * 100_000,  # valid JSON, nested deeper than any parser's stack
]


@dataclass
class Findings:
    """What went wrong, one entry per distinct (operation, problem)."""

    seen: set[tuple[str, str]] = field(default_factory=set)
    reports: list[str] = field(default_factory=list)
    calls: int = 0
    statuses: dict[str, dict[int, int]] = field(default_factory=dict)

    def add(self, label: str, problem: str, report: str) -> None:
        if (label, problem) not in self.seen:
            self.seen.add((label, problem))
            self.reports.append(f"{label}: {problem}\n{report}")


Generated = tuple[schemathesis.Case, bytes | None]  # a case, and raw bytes to send as its body


def first_ids(operation: schemathesis.APIOperation, world: dict[str, list[str]]) -> dict[str, str]:
    """The first real value of each path parameter (one not listed is left to the fuzzer)."""
    return {p.name: world[p.name][0] for p in operation.path_parameters if p.name in world}


def explicit_cases(
    operation: schemathesis.APIOperation, real_paths: list[dict[str, list[str]]]
) -> Iterator[Generated]:
    for world in real_paths:
        ids = first_ids(operation, world)
        for parameter in operation.query:
            for value in REAL_QUERY.get(parameter.name, []):
                yield operation.Case(path_parameters=ids, query={parameter.name: value}), None
        if operation.label in GOOD_BODY:
            for _ in range(2):
                yield (
                    operation.Case(path_parameters=ids, body=dict(GOOD_BODY[operation.label])),
                    None,
                )
        elif not operation.query and not operation.body:
            yield operation.Case(path_parameters=ids), None
    if operation.body:
        ids = first_ids(operation, real_paths[0])
        for raw in JUNK:
            yield operation.Case(path_parameters=ids), raw


def real_ids(
    operation: schemathesis.APIOperation, real_paths: list[dict[str, list[str]]]
) -> st.SearchStrategy[tuple[dict[str, str], dict[str, str]]]:
    """Real path parameters and a random subset of real query parameters for `operation`."""
    names = [p.name for p in operation.path_parameters]
    path = st.sampled_from(real_paths).flatmap(
        lambda world: st.fixed_dictionaries(
            {n: st.sampled_from(world[n]) for n in names if n in world}
        )
    )
    known = [p.name for p in operation.query if p.name in REAL_QUERY]
    query = st.fixed_dictionaries(
        {}, optional={name: st.sampled_from(REAL_QUERY[name]) for name in known}
    )
    return st.tuples(path, query)


def steer_body(case: schemathesis.Case) -> st.SearchStrategy[schemathesis.Case]:
    """Mostly swap body fields for values the parsers accept (two times in three each)."""
    if not isinstance(case.body, dict):
        return st.just(case)
    fields = [name for name in case.body if name in REAL_BODY]

    def apply(swaps: dict[str, Any]) -> schemathesis.Case:
        case.body.update({name: value for name, value in swaps.items() if value is not KEEP})
        return case

    return st.fixed_dictionaries(
        {name: st.sampled_from([*REAL_BODY[name], *REAL_BODY[name], KEEP]) for name in fields}
    ).map(apply)


def case_strategy(
    operation: schemathesis.APIOperation, real_paths: list[dict[str, list[str]]]
) -> st.SearchStrategy[Generated]:
    """Mostly real ids with schema-valid data; also schema-breaking data, random ids and, for
    operations with a body, random bytes instead of the body."""
    positive = schemathesis.GenerationMode.POSITIVE
    negative = schemathesis.GenerationMode.NEGATIVE

    def with_real_ids(mode: schemathesis.GenerationMode) -> st.SearchStrategy[schemathesis.Case]:
        return real_ids(operation, real_paths).flatmap(
            lambda ids: operation.as_strategy(mode, path_parameters=ids[0], query=ids[1] or None)
        )

    real_positive = with_real_ids(positive).flatmap(steer_body)
    cases = st.one_of(
        real_positive,
        real_positive,
        real_positive,
        with_real_ids(negative),
        operation.as_strategy(positive),
        operation.as_strategy(negative),
    )
    if not operation.body:
        return st.tuples(cases, st.none())
    return st.tuples(cases, st.one_of(st.none(), st.none(), st.none(), st.binary(max_size=64)))


def describe(case: schemathesis.Case, raw: bytes | None) -> str:
    """The exact request, as curl."""
    if raw is None:
        return case.as_curl_command(headers=AUTH)
    command, url = case.as_curl_command(headers={**AUTH, **JSON}).rsplit(" ", 1)
    shown = raw if len(raw) <= 80 else raw[:30] + b"..." + raw[-30:]
    return f"{command} --data-binary @body.json {url}\n    body.json: {len(raw)} bytes: {shown!r}"


def report(
    case: schemathesis.Case,
    raw: bytes | None,
    response: schemathesis.Response,
    problems: list[str],
) -> str:
    text = response.content.decode(errors="replace")
    text = text if len(text) <= 400 else text[:400] + "..."
    content_type = ", ".join(response.headers.get("content-type", []))
    lines = [
        f"  request:  {describe(case, raw)}",
        f"  response: {response.status_code} ({content_type}): {text}",
    ]
    return "\n".join([*lines, *(f"  - {problem}" for problem in problems)])


def fuzz_operation(
    operation: schemathesis.APIOperation,
    session: requests.Session,
    real_paths: list[dict[str, list[str]]],
    findings: Findings,
) -> None:
    statuses = findings.statuses.setdefault(operation.label, {})

    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,  # the same cases on every run and in CI
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # failures are collected, never shrunk
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @given(generated=case_strategy(operation, real_paths))
    def run(generated: Generated) -> None:
        case, raw = generated
        findings.calls += 1
        extra: dict[str, Any] = {} if raw is None else {"data": raw}
        headers = AUTH if raw is None else {**AUTH, **JSON}
        try:
            response = case.call(session=session, headers=headers, timeout=30, **extra)
        except requests.RequestException as exc:  # the server dropped the connection
            findings.add(operation.label, type(exc).__name__, describe(case, raw))
            return
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except FailureGroup as group:
            problems = [
                f"{f.title}: {' / '.join(f.message.splitlines())}".rstrip(": ")
                for f in group.exceptions
            ]
            titles = ", ".join(sorted({f.title for f in group.exceptions}))
            findings.add(operation.label, titles, report(case, raw, response, problems))

    for explicit in reversed(list(explicit_cases(operation, real_paths))):
        run = example(generated=explicit)(run)  # run in the order listed
    run()


def fuzz(
    document: dict[str, Any], base_url: str, real_paths: list[dict[str, list[str]]]
) -> Findings:
    config = schemathesis.Config.from_dict(
        # report the exact request: the token and idempotency keys here are test values
        {"base-url": base_url, "headers": AUTH, "output": {"sanitization": {"enabled": False}}}
    )
    schema = schemathesis.openapi.from_dict(document, config=config)
    operations = [result.ok() for result in schema.get_all_operations()]
    # Removals last (members after keys, since removing a member revokes its keys), so the ids
    # the other operations aim at still exist for them.
    operations.sort(key=lambda op: (op.method.upper() == "DELETE", "{email}" in op.path))
    findings = Findings()
    for operation in operations:
        with requests.Session() as session:
            fuzz_operation(operation, session, real_paths, findings)
    return findings


async def request(
    server: TestServer, method: str, path: str, body: object = None
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, server.make_url(path), json=body, headers=AUTH) as response,
    ):
        return response.status, await response.json()


async def test_fuzz_the_admin_api_from_its_openapi_document(
    start_proxy: Callable[..., Any],
) -> None:
    server: TestServer = await start_proxy(orgs=ORGS)
    status, document = await request(server, "GET", "/admin/v1/openapi.json")
    assert status == 200 and document["paths"], document
    real_paths = []
    for world in REAL_PATHS:
        prefixes = []
        for email in world["email"] * 2:
            path = f"/admin/v1/orgs/{world['org'][0]}/members/{email}/keys"
            status, issued = await request(server, "POST", path)
            assert status == 201, issued
            prefixes.append(issued["prefix"])
        real_paths.append({**world, "prefix": prefixes})
    base_url = str(server.make_url("")).rstrip("/")

    started = time.monotonic()
    # schemathesis calls are blocking HTTP: run them off the event loop that serves them
    findings = await asyncio.to_thread(fuzz, document, base_url, real_paths)
    elapsed = time.monotonic() - started
    print(f"{findings.calls} calls in {elapsed:.1f} s; statuses per operation:")
    for label, seen in findings.statuses.items():
        print(f"  {label}: {dict(sorted(seen.items()))}")

    operations = sum(len(methods) for methods in document["paths"].values())
    assert findings.calls >= MAX_EXAMPLES * operations, findings.calls
    if findings.reports:
        pytest.fail(
            f"{len(findings.reports)} problems in {findings.calls} calls ({elapsed:.1f} s):\n\n"
            + "\n\n".join(findings.reports),
            pytrace=False,
        )
    # the real ids got the cases past the 404s: every operation succeeded at least once
    for label, seen in findings.statuses.items():
        assert any(200 <= status < 300 for status in seen), (label, seen)
