"""Request bodies of the admin API: each field is a JSON schema and the parser that enforces it,
so the OpenAPI document and the validation can never disagree. Field names are orgs.toml's."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from proxy.errors import Refusal, bad_request
from proxy.money import MoneyError, usd_to_nanos

UNLIMITED = "unlimited"
OFF = "off"


@dataclass(frozen=True, slots=True)
class Field:
    schema: dict[str, Any]
    parse: Callable[[str, Any], Any]  # (field name, JSON value) -> parsed value, or Refusal


def read_body(raw: bytes, fields: Mapping[str, Field], *, required: tuple[str, ...] = ()) -> dict:
    """Parse a JSON object whose keys are among `fields`; every problem names its field."""
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, RecursionError):  # decode errors are ValueErrors; RecursionError: nesting
        raise bad_request("body: not valid JSON (or nested too deeply)") from None
    if not isinstance(body, dict):
        raise bad_request("body: must be a JSON object")
    return parse_fields(body, fields, required=required)


def parse_fields(
    values: Mapping[str, Any], fields: Mapping[str, Field], *, required: tuple[str, ...] = ()
) -> dict:
    """Values as a JSON body (or a web form) gives them, each checked by its field's parser."""
    for name in values:
        if name not in fields:
            raise bad_request(f"{name}: unknown field (allowed: {', '.join(fields)})")
    for name in required:
        if name not in values:
            raise bad_request(f"{name}: required")
    return {name: fields[name].parse(name, value) for name, value in values.items()}


def body_schema(fields: Mapping[str, Field], required: tuple[str, ...] = ()) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {name: f.schema for name, f in fields.items()},
    }
    if required:
        schema["required"] = list(required)
    return schema


def _usd(name: str, value: Any, *, positive: bool) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise bad_request(f'{name}: must be a USD amount (a number or a string like "12.50")')
    try:
        nanos = usd_to_nanos(value)
    except MoneyError as exc:
        raise bad_request(f"{name}: {exc}") from None
    if nanos < 0 or (positive and nanos == 0):
        raise bad_request(f"{name}: must be {'more than 0' if positive else '0 or more'}")
    return nanos


def parse_amount(name: str, value: Any) -> int:
    return _usd(name, value, positive=True)


def parse_limit(name: str, value: Any) -> int | None:
    """A monthly limit: an amount in USD, or "unlimited" (None)."""
    if value == UNLIMITED:
        return None
    return _usd(name, value, positive=False)


def parse_text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        raise bad_request(f"{name}: must be a non-empty string of at most 200 characters")
    return value


def parse_timezone(name: str, value: Any) -> str:
    zone = parse_text(name, value)
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise bad_request(f"{name}: unknown time zone {zone!r}") from None
    return zone


def parse_extra_usage(name: str, value: Any) -> str | tuple[str, ...]:
    if value in (OFF, "all"):
        return value
    if isinstance(value, list) and all(isinstance(e, str) and "@" in e for e in value):
        return tuple(value)
    raise bad_request(f'{name}: must be "off", "all" or a list of member emails')


def parse_auto_reload(name: str, value: Any) -> tuple[int, int] | None:
    if value == OFF:
        return None
    if not isinstance(value, dict) or set(value) != {"threshold_usd", "amount_usd"}:
        raise bad_request(f'{name}: must be "off" or {{"threshold_usd": ..., "amount_usd": ...}}')
    return (
        _usd(f"{name}.threshold_usd", value["threshold_usd"], positive=False),
        _usd(f"{name}.amount_usd", value["amount_usd"], positive=True),
    )


def parse_reservation(name: str, value: Any) -> str:
    if value not in ("worst_case", "expected"):
        raise bad_request(f'{name}: must be "worst_case" or "expected"')
    return value


def parse_webhook(name: str, value: Any) -> tuple[str, str] | None:
    if value == OFF:
        return None
    if not isinstance(value, dict) or set(value) != {"url", "secret_env"}:
        raise bad_request(f'{name}: must be "off" or {{"url": ..., "secret_env": ...}}')
    url = parse_text(f"{name}.url", value["url"])
    if not url.startswith(("http://", "https://")):
        raise bad_request(f"{name}.url: must be an http(s) URL")
    return url, parse_text(f"{name}.secret_env", value["secret_env"])


USD = {"oneOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": r"^\d+(\.\d+)?$"}]}
LIMIT = {"oneOf": [*USD["oneOf"], {"const": UNLIMITED}]}

ORG_PATCH = {
    "timezone": Field({"type": "string"}, parse_timezone),
    "extra_usage": Field(
        {"oneOf": [{"enum": [OFF, "all"]}, {"type": "array", "items": {"type": "string"}}]},
        parse_extra_usage,
    ),
    "monthly_spend_limit_usd": Field(LIMIT, parse_limit),
    "auto_reload": Field(
        {
            "oneOf": [
                {"const": OFF},
                {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["threshold_usd", "amount_usd"],
                    "properties": {"threshold_usd": USD, "amount_usd": USD},
                },
            ]
        },
        parse_auto_reload,
    ),
    "reservation": Field({"enum": ["worst_case", "expected"]}, parse_reservation),
    "webhook": Field(
        {
            "oneOf": [
                {"const": OFF},
                {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["url", "secret_env"],
                    "properties": {"url": {"type": "string"}, "secret_env": {"type": "string"}},
                },
            ]
        },
        parse_webhook,
    ),
}
CREDITS = {
    "amount_usd": Field(USD, parse_amount),
    "idempotency_key": Field({"type": "string", "minLength": 1, "maxLength": 200}, parse_text),
}
TIER_LIMIT = {"monthly_spend_limit_usd": Field(LIMIT, parse_limit)}


def _choice(*allowed: str) -> Callable[[str, Any], str]:
    def parse(name: str, value: Any) -> str:
        if value not in allowed:
            raise bad_request(f"{name}: must be one of {', '.join(allowed)}")
        return value

    return parse


def parse_org_id(name: str, value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", value):
        raise bad_request(f"{name}: lowercase letters, digits and dashes, at most 63")
    return value


def parse_email(name: str, value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[^@\s]{1,64}@[^@\s]{1,189}", value):
        raise bad_request(f"{name}: must be an email address")
    return value


def parse_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise bad_request(f"{name}: must be true or false")
    return value


def parse_member_limit(name: str, value: Any) -> int | None:
    """Enterprise: the member's own monthly limit, or null to follow the tier's."""
    return None if value is None else _usd(name, value, positive=False)


PLAN_NAMES = ("team", "enterprise", "max")
ROLE_NAMES = ("primary_owner", "owner", "member")
ORG_CREATE = {
    "id": Field({"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,62}$"}, parse_org_id),
    "plan": Field({"enum": list(PLAN_NAMES)}, _choice(*PLAN_NAMES)),
    "timezone": Field({"type": "string"}, parse_timezone),
}
MEMBER_PATCH = {
    "role": Field({"enum": list(ROLE_NAMES)}, _choice(*ROLE_NAMES)),
    "tier": Field({"type": "string"}, parse_text),
    "extra_usage": Field({"type": "boolean"}, parse_bool),
    "monthly_spend_limit_usd": Field(
        {"oneOf": [*USD["oneOf"], {"type": "null"}]}, parse_member_limit
    ),
    "extra_usage_consent": Field({"enum": ["ask", "always"]}, _choice("ask", "always")),
}
MEMBER_CREATE = {"email": Field({"type": "string"}, parse_email), **MEMBER_PATCH}


def conflict(message: str) -> Refusal:
    return Refusal(409, "invalid_request_error", message, outcome="conflict")


def not_found(message: str) -> Refusal:
    return Refusal(404, "not_found_error", message, outcome="not_found")


def forbidden(message: str) -> Refusal:
    return Refusal(403, "permission_error", message, outcome="forbidden")
