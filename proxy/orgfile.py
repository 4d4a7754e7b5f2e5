"""The declarative setup file (orgs.toml): orgs, members and keys, applied idempotently on start."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from proxy.auth import hash_key, key_prefix
from proxy.errors import ConfigError
from proxy.ledger import PREPAID_PLANS
from proxy.settings import Plans, TableReader, read_toml
from proxy.store.base import Limit, MemberSpec, OrgSpec

PLANS = ("team", "enterprise", "max")
ROLES = ("primary_owner", "owner", "member")
CONSENTS = ("ask", "always")
KEY_CHARS_MIN = 20  # a plain key in the file must be long enough not to be guessed


def load_orgs(path: Path, plans: Plans) -> list[OrgSpec]:
    return parse_orgs(read_toml(path), str(path), plans)


def parse_orgs(data: dict[str, Any], source: str, plans: Plans) -> list[OrgSpec]:
    top = TableReader(data, source, "")
    raw_orgs = top.get("orgs", list, [])
    top.done()
    orgs = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_orgs):
        orgs.append(_parse_org(TableReader(raw, source, f"orgs[{index}]"), plans))
        if orgs[-1].id in seen:
            raise ConfigError(source, f"orgs[{index}].id", f"duplicate org {orgs[-1].id!r}")
        seen.add(orgs[-1].id)
    return orgs


def _parse_org(t: TableReader, plans: Plans) -> OrgSpec:
    org_id = t.get("id", str, "")
    if not org_id:
        raise t.fail("id", "missing")
    plan = _choice(t, "plan", PLANS, None)
    timezone = t.get("timezone", str, "UTC")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise t.fail("timezone", f"unknown time zone {timezone!r}") from None
    extra = t.get("extra_usage", (str, list), "off")
    if isinstance(extra, list):
        mode, selected = "selected", tuple(str(e) for e in extra)
    elif extra in ("off", "all"):
        mode, selected = extra, ()
    else:
        raise t.fail("extra_usage", f'must be "off", "all" or a list of emails, got {extra!r}')
    prepaid = plan in PREPAID_PLANS
    reload = t.table("auto_reload")
    threshold_nanos = reload.usd("threshold_usd", None)
    amount_nanos = reload.usd("amount_usd", None)
    reload.done()
    if (threshold_nanos is None) != (amount_nanos is None):
        raise t.fail("auto_reload", "needs both threshold_usd and amount_usd")
    if amount_nanos == 0:
        raise reload.fail("amount_usd", "must be more than 0")
    credits_nanos = t.usd("credits_usd", None)
    monthly_limit = _limit(t, "monthly_spend_limit_usd")
    if not prepaid and (credits_nanos is not None or amount_nanos is not None):
        raise t.fail(
            "credits_usd" if credits_nanos is not None else "auto_reload",
            f"{plan} is postpaid: no prepaid credits or auto-reload",
        )
    tier_table = t.table("tier_limits_usd")
    tier_limits = {name: _limit(tier_table, name) for name in tier_table.data}
    tier_table.done()
    for name in tier_limits:
        if name not in plans.tiers:
            raise tier_table.fail(name, f"unknown tier {name!r}")
    if tier_limits and plan != "enterprise":
        raise t.fail("tier_limits_usd", "seat-tier limits are for enterprise plans")
    reservation = t.get("reservation", str, None)
    if reservation not in (None, "worst_case", "expected"):
        raise t.fail("reservation", f'must be "worst_case" or "expected", got {reservation!r}')
    hook = t.table("webhook")
    webhook_url = hook.get("url", str, None)
    webhook_secret_env = hook.get("secret_env", str, None)
    hook.done()
    if webhook_url is not None and not webhook_url.startswith(("http://", "https://")):
        raise hook.fail("url", f"must be an http(s) URL, got {webhook_url!r}")
    if (webhook_url is None) != (webhook_secret_env is None):
        raise t.fail("webhook", "needs both url and secret_env")
    members = tuple(
        _parse_member(TableReader(raw, t.source, f"{t.path}.members[{i}]"), plans)
        for i, raw in enumerate(t.get("members", list, []))
    )
    t.done()
    emails = [m.email for m in members]
    for email in selected:
        if email not in emails:
            raise t.fail("extra_usage", f"{email!r} is not a member of {org_id!r}")
    if plan != "enterprise":
        for i, m in enumerate(members):
            if m.monthly_limit is not None:
                raise ConfigError(
                    t.source,
                    f"{t.path}.members[{i}].monthly_spend_limit_usd",
                    "member limits are for enterprise plans",
                )
    return OrgSpec(
        id=org_id,
        plan=plan,
        monthly_limit=monthly_limit,
        reload_threshold_nanos=threshold_nanos,
        reload_amount_nanos=amount_nanos,
        credits_nanos=credits_nanos,
        tier_limits=tier_limits,
        reservation=reservation,
        webhook_url=webhook_url,
        webhook_secret_env=webhook_secret_env,
        timezone=timezone,
        extra_usage=mode,
        extra_usage_members=selected,
        members=members,
    )


def _parse_member(t: TableReader, plans: Plans) -> MemberSpec:
    email = t.get("email", str, "")
    if "@" not in email:
        raise t.fail("email", f"must be an email address, got {email!r}")
    tier = t.get("tier", str, "standard")
    if tier not in plans.tiers:
        raise t.fail("tier", f"unknown tier {tier!r} (plans.toml has {sorted(plans.tiers)})")
    keys = t.get("key", (str, list), [])
    keys = [keys] if isinstance(keys, str) else keys
    for index, key in enumerate(keys):
        if not isinstance(key, str) or len(key.strip()) < KEY_CHARS_MIN or key != key.strip():
            name = "key" if isinstance(t.data.get("key"), str) else f"key[{index}]"
            raise t.fail(  # never the key itself: the message is printed and logged
                name,
                f"must be a string of at least {KEY_CHARS_MIN} characters without surrounding "
                "spaces (make one with: python3 -c 'import secrets; "
                'print("sk-" + secrets.token_urlsafe(32))\')',
            )
    shas = t.get("key_sha256", (str, list), [])
    shas = [shas] if isinstance(shas, str) else shas
    for sha in shas:
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise t.fail("key_sha256", "must be 64 lowercase hex digits")
    spec = MemberSpec(
        monthly_limit=_limit(t, "monthly_spend_limit_usd"),
        email=email,
        role=_choice(t, "role", ROLES, "member"),
        tier=tier,
        key_sha256s=tuple(hash_key(k) for k in keys) + tuple(shas),
        key_prefixes=tuple(key_prefix(k) for k in keys) + tuple(s[:12] for s in shas),
        extra_usage_consent=_choice(t, "extra_usage_consent", CONSENTS, "ask"),
    )
    t.done()
    return spec


def _limit(t: TableReader, name: str) -> Limit:
    """A monthly limit: an amount, "unlimited", or None when the file does not say."""
    if t.data.get(name) == "unlimited":
        t.get(name, str, None)
        return "unlimited"
    return t.usd(name, None)


def _choice(t: TableReader, name: str, allowed: tuple[str, ...], default: str | None) -> str:
    value = t.get(name, str, default)
    if value not in allowed:
        raise t.fail(name, f"must be one of {', '.join(allowed)}; got {value!r}")
    return value
