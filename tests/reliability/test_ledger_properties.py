"""Ledger properties, stateful (hypothesis): random sequences of reserve / settle / expire /
purchase / reload / limit change across members and month boundaries, against the real SQLite
store, keep every invariant after every step."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import tempfile
import tomllib
from pathlib import Path

from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
)

from proxy.auth import hash_key
from proxy.ledger import BALANCE, Admitted
from proxy.metering import Usage
from proxy.orgfile import parse_orgs
from proxy.settings import Plans, StoreSettings
from proxy.store import open_store
from proxy.store.base import AdmissionRequest, IdempotencyConflict, Settlement

PLANS = Plans.from_mapping(
    {"tiers": {"standard": {"session_included_usd": 0.0005, "session_window_hours": 5}}},
    "plans.toml",
)
TIERS = PLANS.tiers
TTL_S = 900
START_S = 1_769_889_600.0  # 2026-01-31T20:00:00Z: a few steps cross into February
MEMBERS = {
    "alice@acme.test": "sk-prop-alice-00000000000001",
    "bob@acme.test": "sk-prop-bob-000000000000002",
}
ORGS = f"""
[[orgs]]
id = "acme"
plan = "team"
extra_usage = "all"
monthly_spend_limit_usd = 0.01
credits_usd = 0.0025
auto_reload = {{ threshold_usd = 0.002, amount_usd = 0.003 }}

[[orgs.members]]
email = "alice@acme.test"
role = "owner"
key = "{MEMBERS["alice@acme.test"]}"
extra_usage_consent = "always"

[[orgs.members]]
email = "bob@acme.test"
key = "{MEMBERS["bob@acme.test"]}"
"""
NANOS = st.integers(min_value=1, max_value=3_000_000)  # a worst case: up to $0.003


class LedgerMachine(RuleBasedStateMachine):
    """The model keeps what each request may still do; the store must agree, step by step."""

    pending = Bundle("pending")  # admitted, not yet settled (may have expired meanwhile)
    settled = Bundle("settled")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.folder = Path(tempfile.mkdtemp(prefix="ledger-"))
        self.now_s = START_S
        self.store = self.run(open_store(StoreSettings(url=f"sqlite:///{self.folder / 'l.db'}")))
        orgs = parse_orgs(tomllib.loads(ORGS), "orgs.toml", PLANS)
        self.run(self.store.apply_orgs(orgs, self.now_s))
        self.member_ids = {
            email: self.run(self.store.find_seat(hash_key(key))).member_id
            for email, key in MEMBERS.items()
        }
        self.requests = 0
        self.resolved: dict[str, int] = {}  # request id -> how many settlements did something
        self.purchases: dict[str, int] = {}  # idempotency key -> amount
        self.reloads: list = []  # orders handed out by settlements, not yet finished

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        self.run(self.store.database.flush())  # the journal's records into the tables
        with sqlite3.connect(self.folder / "l.db") as db:
            return db.execute(sql, params).fetchall()

    @initialize()
    def opened(self) -> None:
        """Alice spends her session's included quota first, so that most of what follows runs
        on extra usage (month limit, prepaid balance, reloads)."""
        assert self.run(self.store.verify(self.now_s)).mismatches == ()
        request_id = self.reserve("alice@acme.test", 1_000_000)
        self.settle(request_id, 1_000_000)

    @rule(target=pending, member=st.sampled_from(sorted(MEMBERS)), worst_case_nanos=NANOS)
    def reserve(self, member: str, worst_case_nanos: int):
        self.requests += 1
        request_id = f"r{self.requests}"
        admission = self.run(
            self.store.admit(
                AdmissionRequest(
                    request_id=request_id,
                    member_id=self.member_ids[member],
                    org_id="acme",
                    model="claude-haiku-4-5",
                    stream=True,
                    worst_case_nanos=worst_case_nanos,
                    max_tokens=max(1, worst_case_nanos // 5000),
                    output_nanos_per_token=5000,
                    continue_requested=False,
                    created_at_s=self.now_s,
                    expires_at_s=self.now_s + TTL_S,
                ),
                TIERS,
            )
        )
        if not isinstance(admission.decision, Admitted):
            return multiple()
        # an admission that reserves extra usage never takes an account past its limit
        [(extra_nanos,)] = self.rows(
            "SELECT extra_reserved_nanos FROM requests WHERE id = ?", (request_id,)
        )
        status = self.run(self.store.member_status(self.member_ids[member], TIERS, self.now_s))
        for account in status.funds.accounts if extra_nanos else ():
            if account.name == BALANCE:
                assert account.reserved_nanos <= account.limit_nanos
            elif account.limit_nanos is not None and account.reserved_nanos:
                assert account.used_nanos + account.reserved_nanos <= account.limit_nanos
        self.resolved[request_id] = 0
        return request_id

    @rule(target=settled, request_id=consumes(pending), cost_nanos=st.integers(0, 5_000_000))
    def settle(self, request_id: str, cost_nanos: int):
        """Post what was used: less than, equal to, or more than reserved (an estimate that
        fell short); a void when cost is 0 and nothing was billable."""
        usage = Usage(input_tokens=1) if cost_nanos else None
        [(status, extra_nanos)] = self.rows(
            "SELECT status, extra_reserved_nanos FROM requests WHERE id = ?", (request_id,)
        )
        event(f"settle a {status} request{' with extra usage' if extra_nanos else ''}")
        done = self.run(self.store.settle(self.settlement(request_id, usage, cost_nanos), TIERS))
        assert done is not None
        self.resolved[request_id] += 1
        if done.reload is not None:
            event("a reload was ordered")
            assert all(order.org_id != done.reload.org_id for order in self.reloads)  # one open
            self.reloads.append(done.reload)
        return request_id

    @rule(
        member=st.sampled_from(sorted(MEMBERS)),
        worst_case_nanos=NANOS,
        cost_nanos=st.integers(0, 5_000_000),
        expire_first=st.booleans(),
    )
    def request(
        self, member: str, worst_case_nanos: int, cost_nanos: int, expire_first: bool
    ) -> None:
        """A whole request in one step (most steps should move money): reserve, then settle;
        or a stream that outlives its reservation: reserve, expire, then settle late."""
        request_id = self.reserve(member, worst_case_nanos)
        if not isinstance(request_id, str):
            return
        if expire_first:
            self.now_s += TTL_S
            self.expire()
        self.settle(request_id, cost_nanos)

    @rule(request_id=settled, cost_nanos=NANOS)
    def settle_again(self, request_id: str, cost_nanos: int) -> None:
        """A replayed settlement (a retry after a lost answer) does nothing."""
        before = self.rows("SELECT COUNT(*), COALESCE(SUM(amount_nanos), 0) FROM transfers")
        done = self.run(
            self.store.settle(self.settlement(request_id, Usage(input_tokens=1), cost_nanos), TIERS)
        )
        assert done is None
        assert self.rows("SELECT COUNT(*), COALESCE(SUM(amount_nanos), 0) FROM transfers") == before

    @rule(
        seconds=st.sampled_from([1, 60, TTL_S, 3600, 5 * 3600, 3 * 86400, 20 * 86400]),
        sweep=st.booleans(),
    )
    def advance(self, seconds: int, sweep: bool) -> None:
        """Time passes: windows reset, months turn, reservations pass their expiry (and the
        sweeper may run right away)."""
        self.now_s += seconds
        if sweep:
            self.expire()

    @rule()
    def expire(self) -> None:
        due = self.rows(
            "SELECT COUNT(*) FROM requests WHERE status = 'pending' AND expires_at_s <= ?",
            (self.now_s,),
        )[0][0]
        assert self.run(self.store.expire_pending(self.now_s)) == due
        assert self.run(self.store.expire_pending(self.now_s)) == 0  # each expires once

    @rule(amount_nanos=st.integers(1, 5_000_000), key=st.sampled_from(["p1", "p2", "p3"]))
    def purchase(self, amount_nanos: int, key: str) -> None:
        try:
            bought = self.run(self.store.purchase("acme", amount_nanos, key, self.now_s))
        except IdempotencyConflict:
            assert self.purchases[key] != amount_nanos
            return
        assert bought.replayed == (key in self.purchases)
        self.purchases.setdefault(key, amount_nanos)

    @rule(paid=st.booleans())
    def finish_reload(self, paid: bool) -> None:
        if self.reloads:
            self.run(self.store.finish_reload(self.reloads.pop(0), paid, self.now_s))

    @rule(limit_nanos=st.none() | st.integers(0, 20_000_000))
    def change_limit(self, limit_nanos: int | None) -> None:
        self.run(self.store.update_org("acme", {"monthly_limit_nanos": limit_nanos}))

    def settlement(self, request_id: str, usage: Usage | None, cost_nanos: int) -> Settlement:
        return Settlement(
            request_id=request_id,
            usage=usage,
            cost_nanos=cost_nanos if usage is not None else 0,
            upstream_status=200,
            outcome="ok",
            settled_at_s=self.now_s,
            upstream_ms=1.0,
            duration_ms=1.0,
        )

    @invariant()
    def balances_equal_the_sums_of_their_transfers(self) -> None:
        assert self.run(self.store.verify(self.now_s)).mismatches == ()
        [(balance, reserved)] = self.rows("SELECT balance_nanos, balance_reserved_nanos FROM orgs")
        [(summed,)] = self.rows("SELECT COALESCE(SUM(amount_nanos), 0) FROM transfers")
        assert balance == summed and reserved >= 0
        # the balance only goes below zero by what estimates fell short of (overrun transfers)
        [(overrun,)] = self.rows(
            "SELECT COALESCE(-SUM(amount_nanos), 0) FROM transfers WHERE kind = 'estimate_overrun'"
        )
        assert balance + overrun >= 0

    @invariant()
    def reservations_add_up(self) -> None:
        """What windows, month spend and the balance hold in reserve is exactly the sum of the
        reservations still pending: none leaked, none released twice."""
        [(windows,)] = self.rows("SELECT COALESCE(SUM(reserved_nanos), 0) FROM windows")
        [(pending_included, pending_extra)] = self.rows(
            "SELECT COALESCE(SUM(reserved_nanos), 0), COALESCE(SUM(extra_reserved_nanos), 0) "
            "FROM requests WHERE status = 'pending'"
        )
        # each pending reservation is held by its session window and its weekly one (if any)
        [(session_held,)] = self.rows(
            "SELECT COALESCE(SUM(reserved_nanos), 0) FROM windows WHERE kind = 'session'"
        )
        assert session_held == pending_included and windows >= pending_included
        [(spend_org,)] = self.rows(
            "SELECT COALESCE(SUM(reserved_nanos), 0) FROM spend WHERE member_id = 0"
        )
        [(balance_held,)] = self.rows("SELECT balance_reserved_nanos FROM orgs")
        assert spend_org == pending_extra == balance_held

    @invariant()
    def every_request_is_resolved_at_most_once(self) -> None:
        assert all(count <= 1 for count in self.resolved.values())
        assert (
            self.rows(
                "SELECT request_id FROM transfers WHERE request_id IS NOT NULL "
                "GROUP BY request_id, kind HAVING COUNT(*) > 1"
            )
            == []
        )
        # what a request posts as extra usage never exceeds what it reserved: any excess is an
        # explicit estimate_overrun (the documented shortfall), never a silent pass of a limit
        assert (
            self.rows(
                "SELECT r.id FROM requests r JOIN transfers t ON t.request_id = r.id "
                "WHERE t.kind = 'usage_extra' AND -t.amount_nanos > r.extra_reserved_nanos"
            )
            == []
        )
        statuses = dict(self.rows("SELECT status, COUNT(*) FROM requests GROUP BY status"))
        assert set(statuses) <= {"pending", "posted", "voided", "expired"}


LedgerMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    phases=[Phase.explicit, Phase.generate],
)
test_ledger_invariants_hold_under_random_sequences = LedgerMachine.TestCase
