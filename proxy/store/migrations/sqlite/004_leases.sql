-- The PostgreSQL store's leases (proxy/store/leases.py). The SQLite store takes none (one
-- process decides every step from its own books), so this table stays empty; it is here so
-- that the SQL both stores share (the ledger check, `verify`) reads the same tables.
CREATE TABLE leases (
    id TEXT PRIMARY KEY,
    member_id INTEGER NOT NULL REFERENCES members(id),
    session_started_at_s REAL,
    weekly_started_at_s REAL,
    amount_nanos INTEGER NOT NULL,
    expires_at_s REAL NOT NULL
);
