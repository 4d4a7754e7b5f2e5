-- Organisations, seats, keys and one record per admitted request.
CREATE TABLE orgs (
    id TEXT PRIMARY KEY,
    plan TEXT NOT NULL CHECK (plan IN ('team', 'enterprise', 'max')),
    timezone TEXT NOT NULL DEFAULT 'UTC',
    extra_usage TEXT NOT NULL DEFAULT 'off' CHECK (extra_usage IN ('off', 'all', 'selected')),
    created_at_s REAL NOT NULL
);

CREATE TABLE members (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    org_id TEXT NOT NULL REFERENCES orgs(id),
    email TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('primary_owner', 'owner', 'member')),
    tier TEXT NOT NULL,
    extra_usage_enabled INTEGER NOT NULL DEFAULT 0,
    extra_usage_consent TEXT NOT NULL DEFAULT 'ask' CHECK (extra_usage_consent IN ('ask', 'always')),
    consent_until_s REAL,  -- the member chose to continue on extra usage until this instant
    removed INTEGER NOT NULL DEFAULT 0,
    created_at_s REAL NOT NULL,
    UNIQUE (org_id, email)
);

CREATE TABLE keys (
    key_sha256 TEXT PRIMARY KEY,
    member_id INTEGER NOT NULL REFERENCES members(id),
    prefix TEXT NOT NULL,
    created_at_s REAL NOT NULL,
    revoked_at_s REAL
);
CREATE INDEX keys_member ON keys (member_id);

-- The value each declared field had when orgs.toml was last applied (see proxy/orgfile.py).
CREATE TABLE declared (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE requests (
    id TEXT PRIMARY KEY,
    member_id INTEGER NOT NULL REFERENCES members(id),
    org_id TEXT NOT NULL,
    model TEXT NOT NULL,
    stream INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'posted', 'voided', 'expired')),
    billing TEXT NOT NULL DEFAULT 'included' CHECK (billing IN ('included', 'extra')),
    reserved_nanos INTEGER NOT NULL DEFAULT 0,
    session_started_at_s REAL,  -- the windows this request bills (as open at admission)
    weekly_started_at_s REAL,
    included_nanos INTEGER NOT NULL DEFAULT 0,
    extra_nanos INTEGER NOT NULL DEFAULT 0,
    overrun_nanos INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    cache_creation_5m_input_tokens INTEGER NOT NULL DEFAULT 0,
    cache_creation_1h_input_tokens INTEGER NOT NULL DEFAULT 0,
    cache_read_input_tokens INTEGER NOT NULL DEFAULT 0,
    web_search_requests INTEGER NOT NULL DEFAULT 0,
    speed TEXT NOT NULL DEFAULT 'standard',
    output_estimated INTEGER NOT NULL DEFAULT 0,
    cost_nanos INTEGER NOT NULL DEFAULT 0,
    upstream_status INTEGER,
    outcome TEXT,
    created_at_s REAL NOT NULL,
    expires_at_s REAL NOT NULL,
    settled_at_s REAL,
    upstream_ms REAL,
    duration_ms REAL
);
CREATE INDEX requests_member_created ON requests (member_id, created_at_s);
CREATE INDEX requests_pending ON requests (status, expires_at_s) WHERE status = 'pending';

-- A member's session and weekly windows; the newest row of a kind is the current one.
CREATE TABLE windows (
    member_id INTEGER NOT NULL REFERENCES members(id),
    kind TEXT NOT NULL CHECK (kind IN ('session', 'weekly')),
    started_at_s REAL NOT NULL,
    ends_at_s REAL NOT NULL,
    used_nanos INTEGER NOT NULL DEFAULT 0,
    reserved_nanos INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (member_id, kind, started_at_s)
);

-- Process-wide secrets made once per database (e.g. the key that signs continue links).
CREATE TABLE secrets (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO secrets (name, value) VALUES ('continue_link', lower(hex(randomblob(32))));
