"""Settings: frozen dataclasses read once from config/*.toml and the environment, validated."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.errors import ConfigError
from proxy.money import MoneyError, usd_to_nanos
from proxy.pricing import PriceTable

INCLUDED_ADMISSION_RULES = ("any_remaining", "worst_case")


class TableReader:
    """Reads one TOML table, remembering which keys were used so unknown keys are refused."""

    def __init__(self, data: Any, source: str, path: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(source, path or "(top)", "must be a table")
        self.data, self.source, self.path = data, source, path
        self._used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), problem)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self._used.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise self.fail(name, f"expected {_kind_name(kinds)}, got {value!r}")
        if not isinstance(value, kinds):
            raise self.fail(name, f"expected {_kind_name(kinds)}, got {value!r}")
        return value

    def number(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        value = self.get(name, (int, float), default)
        if value < minimum:
            raise self.fail(name, f"must be at least {minimum}, got {value}")
        return value

    def usd(self, name: str, default: int | None) -> int | None:
        """A USD amount into nanos; absent keeps the default (nanos)."""
        value = self.get(name, (int, float, str), None)
        if value is None:
            return default
        try:
            nanos = usd_to_nanos(value)
        except MoneyError as exc:
            raise self.fail(name, str(exc)) from None
        if nanos < 0:
            raise self.fail(name, f"must not be negative, got {value}")
        return nanos

    def table(self, name: str) -> TableReader:
        return TableReader(self.get(name, dict, {}), self.source, self.key(name))

    def done(self) -> None:
        unknown = sorted(set(self.data) - self._used)
        if unknown:
            raise self.fail(unknown[0], "unknown key")


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {
        int: "a number",
        float: "a number",
        str: "a string",
        bool: "true or false",
        dict: "a table",
        list: "a list",
    }
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(str(path), "(file)", "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "(syntax)", str(exc)) from None


@dataclass(frozen=True, slots=True)
class Tier:
    """A seat tier's included quota (plans.toml)."""

    name: str
    session_included_nanos: int
    session_window_s: int = 5 * 3600
    weekly_included_nanos: int | None = None
    weekly_window_s: int = 7 * 24 * 3600
    included_admission: str = "any_remaining"


@dataclass(frozen=True, slots=True)
class Plans:
    tiers: Mapping[str, Tier]

    @classmethod
    def load(cls, path: Path) -> Plans:
        return cls.from_mapping(read_toml(path), str(path))

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str) -> Plans:
        top = TableReader(data, source, "")
        tiers_table = top.table("tiers")
        top.done()
        tiers = {}
        for name in tiers_table.data:
            t = tiers_table.table(name)
            session_nanos = t.usd("session_included_usd", None)
            if session_nanos is None:
                raise t.fail("session_included_usd", "missing")
            rule = t.get("included_admission", str, "any_remaining")
            if rule not in INCLUDED_ADMISSION_RULES:
                raise t.fail("included_admission", f"must be one of {INCLUDED_ADMISSION_RULES}")
            hours = t.number("session_window_hours", 5, minimum=1 / 3600)
            weekly_days = t.number("weekly_window_days", 7, minimum=1 / 86400)
            tiers[name] = Tier(
                name=name,
                session_included_nanos=session_nanos,
                session_window_s=round(hours * 3600),
                weekly_included_nanos=t.usd("weekly_included_usd", None),
                weekly_window_s=round(weekly_days * 86400),
                included_admission=rule,
            )
            t.done()
        if not tiers:
            raise ConfigError(source, "tiers", "at least one tier is needed")
        return cls(tiers=tiers)


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8787
    public_url: str = "http://127.0.0.1:8787"
    max_body_bytes: int = 32 * 1024 * 1024
    key_cache_s: float = 2.0
    log_level: str = "info"
    shutdown_grace_s: float = 30.0  # SIGTERM: in-flight requests get this long to finish
    idle_timeout_s: float = 75.0  # a connection with no request in flight is closed after this


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    base_url: str = "https://api.anthropic.com"
    api_key_env: str = "ANTHROPIC_API_KEY"
    api_key: str = field(default="", repr=False)
    timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    forward_ratelimit_headers: bool = False
    connections_max: int = 200


SQLITE_URL_PREFIX = "sqlite:///"
POSTGRES_URL_PREFIXES = ("postgresql://", "postgres://")
STORE_URL_PREFIXES = (SQLITE_URL_PREFIX, *POSTGRES_URL_PREFIXES)
JOURNAL_DEFAULT = "usage-proxy.journal"  # next to the config file, as a relative SQLite path


@dataclass(frozen=True, slots=True)
class StoreSettings:
    url: str = field(default="sqlite:///usage-proxy.db", repr=False)  # may hold a password
    reservation_ttl_s: int = 900
    pool_size: int = 10  # PostgreSQL: connections per replica
    pool_timeout_s: float = 5.0  # PostgreSQL: wait this long for a free connection, then 503
    settle_retry_s: float = 60.0  # a settlement the store refused is tried again this long
    sweep_interval_s: float = 30.0  # how often expired reservations are looked for
    # PostgreSQL: the replica's own journal file, for admitting from leases (store/leases.py);
    # "" for none (every admission and settlement then commits in a batch first)
    journal: str = ""


@dataclass(frozen=True, slots=True)
class AlertSettings:
    thresholds_pct: tuple[int, ...] = (50, 75, 90, 100)


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings
    upstream: UpstreamSettings
    store: StoreSettings
    prices: PriceTable
    plans: Plans
    orgs_file: Path | None = None
    alerts: AlertSettings = AlertSettings()
    admin_token: str = field(default="", repr=False)
    demo: bool = False


def load_settings(path: Path, env: Mapping[str, str] | None = None) -> Settings:
    """Read proxy.toml and the files it names; a problem is a ConfigError naming file and key."""
    env = os.environ if env is None else env
    source = str(path)
    top = TableReader(read_toml(path), source, "")
    base_dir = path.parent

    s = top.table("server")
    port = s.get("port", int, 8787)
    if not 0 < port < 65536:
        raise s.fail("port", f"must be a TCP port, got {port}")
    host = s.get("host", str, "127.0.0.1")
    server = ServerSettings(
        host=host,
        port=port,
        public_url=s.get("public_url", str, f"http://{host}:{port}").rstrip("/"),
        max_body_bytes=round(s.number("max_body_mb", 32, minimum=0.001) * 1024 * 1024),
        key_cache_s=s.number("key_cache_s", 2.0),
        log_level=s.get("log_level", str, "info"),
        shutdown_grace_s=s.number("shutdown_grace_s", 30.0),
        idle_timeout_s=s.number("idle_timeout_s", 75.0, minimum=0.001),
    )
    s.done()

    u = top.table("upstream")
    api_key_env = u.get("api_key_env", str, "ANTHROPIC_API_KEY")
    upstream = UpstreamSettings(
        base_url=u.get("base_url", str, "https://api.anthropic.com").rstrip("/"),
        api_key_env=api_key_env,
        api_key=env.get(api_key_env, ""),
        timeout_s=u.number("timeout_s", 600, minimum=0.001),
        connect_timeout_s=u.number("connect_timeout_s", 10, minimum=0.001),
        forward_ratelimit_headers=u.get("forward_ratelimit_headers", bool, False),
        connections_max=int(u.number("connections_max", 200, minimum=1)),
    )
    if not upstream.base_url.startswith(("http://", "https://")):
        raise u.fail("base_url", f"must be an http(s) URL, got {upstream.base_url!r}")
    u.done()

    st = top.table("store")
    store = StoreSettings(
        url=_resolve_store_url(st.get("url", str, "sqlite:///usage-proxy.db"), base_dir),
        reservation_ttl_s=int(st.number("reservation_ttl_s", 900, minimum=1)),
        pool_size=int(st.number("pool_size", 10, minimum=1)),
        pool_timeout_s=st.number("pool_timeout_s", 5.0, minimum=0.001),
        settle_retry_s=st.number("settle_retry_s", 60.0, minimum=0),
        sweep_interval_s=st.number("sweep_interval_s", 30.0, minimum=0.01),
        journal=_resolve_path(st.get("journal", str, JOURNAL_DEFAULT), base_dir),
    )
    if not store.url.startswith(STORE_URL_PREFIXES):
        raise st.fail("url", "must start with sqlite:/// or postgresql://")
    st.done()

    f = top.table("files")
    pricing_path = base_dir / f.get("pricing", str, "pricing.toml")
    plans_path = base_dir / f.get("plans", str, "plans.toml")
    orgs_name = f.get("orgs", str, "")
    f.done()

    al = top.table("alerts")
    thresholds = al.get("thresholds_pct", list, [50, 75, 90, 100])
    if not thresholds or any(
        not isinstance(t, int) or isinstance(t, bool) or not 0 < t <= 100 for t in thresholds
    ):
        raise al.fail("thresholds_pct", "must be a list of whole percentages from 1 to 100")
    al.done()

    a = top.table("admin")
    token_env = a.get("token_env", str, "USAGE_PROXY_ADMIN_TOKEN")
    a.done()
    top.get("demo", bool, False)
    top.done()

    return Settings(
        server=server,
        upstream=upstream,
        store=store,
        prices=PriceTable.load(pricing_path),
        plans=Plans.load(plans_path),
        orgs_file=(base_dir / orgs_name) if orgs_name else None,
        alerts=AlertSettings(tuple(sorted(set(thresholds)))),
        admin_token=env.get(token_env, ""),
        demo=bool(top.data.get("demo", False)),
    )


def _resolve_path(path: str, base_dir: Path) -> str:
    """A relative path is relative to the config file; "" stays "" (none)."""
    return str((base_dir / path).resolve()) if path else ""


def _resolve_store_url(url: str, base_dir: Path) -> str:
    """A relative SQLite path is relative to the config file, like every other path in it."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and url != prefix + ":memory:":
        db_path = Path(url[len(prefix) :])
        if not db_path.is_absolute():
            return prefix + str((base_dir / db_path).resolve())
    return url
