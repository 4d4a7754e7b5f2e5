-- Extra usage: money limits, the prepaid balance, and the ledger of transfers.
ALTER TABLE orgs ADD COLUMN monthly_limit_nanos INTEGER;          -- NULL: unlimited
ALTER TABLE orgs ADD COLUMN balance_nanos INTEGER NOT NULL DEFAULT 0;
ALTER TABLE orgs ADD COLUMN balance_reserved_nanos INTEGER NOT NULL DEFAULT 0;
ALTER TABLE orgs ADD COLUMN reload_threshold_nanos INTEGER;       -- NULL: no auto-reload
ALTER TABLE orgs ADD COLUMN reload_amount_nanos INTEGER;
ALTER TABLE orgs ADD COLUMN reload_pending INTEGER NOT NULL DEFAULT 0;
ALTER TABLE orgs ADD COLUMN reservation TEXT NOT NULL DEFAULT 'worst_case';  -- or 'expected'
ALTER TABLE orgs ADD COLUMN webhook_url TEXT;
ALTER TABLE orgs ADD COLUMN webhook_secret_env TEXT;              -- the variable holding the secret
ALTER TABLE members ADD COLUMN monthly_limit_nanos INTEGER;       -- enterprise override
ALTER TABLE requests ADD COLUMN month TEXT;                       -- YYYY-MM in the org's zone
ALTER TABLE requests ADD COLUMN extra_reserved_nanos INTEGER NOT NULL DEFAULT 0;

-- Enterprise: a per-member monthly limit for every member of a seat tier.
CREATE TABLE tier_limits (
    org_id TEXT NOT NULL REFERENCES orgs(id),
    tier TEXT NOT NULL,
    monthly_limit_nanos INTEGER,                                  -- NULL: unlimited
    PRIMARY KEY (org_id, tier)
);

-- Month-to-date extra usage: member_id 0 is the whole org.
CREATE TABLE spend (
    org_id TEXT NOT NULL,
    member_id INTEGER NOT NULL,
    month TEXT NOT NULL,
    posted_nanos INTEGER NOT NULL DEFAULT 0,
    reserved_nanos INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (org_id, member_id, month)
);

-- Immutable transfers; the balance and every month-to-date figure are sums of them.
-- purchase, reload, adjustment: + balance; usage_extra, estimate_overrun: - (extra usage spent).
CREATE TABLE transfers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    org_id TEXT NOT NULL REFERENCES orgs(id),
    member_id INTEGER,
    kind TEXT NOT NULL CHECK (kind IN ('purchase', 'reload', 'adjustment', 'usage_extra',
                                       'estimate_overrun')),
    amount_nanos INTEGER NOT NULL,
    month TEXT NOT NULL,
    request_id TEXT,
    model TEXT,
    idempotency_key TEXT,
    created_at_s REAL NOT NULL,
    UNIQUE (org_id, idempotency_key)
);
CREATE INDEX transfers_org_month ON transfers (org_id, month);

-- Usage alerts, each stored once per (org, member, kind, threshold, period): the key decides.
CREATE TABLE alerts (
    org_id TEXT NOT NULL,
    member_email TEXT NOT NULL,                                   -- '' for org-level alerts
    kind TEXT NOT NULL,
    threshold_pct INTEGER NOT NULL,                               -- 0 where none applies
    period TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at_s REAL NOT NULL,
    PRIMARY KEY (org_id, member_email, kind, threshold_pct, period)
);
