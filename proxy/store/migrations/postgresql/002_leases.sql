-- Headroom a replica holds in a member's windows, to admit and settle from memory
-- (proxy/store/leases.py): `amount_nanos` is counted in the reserved_nanos of the windows that
-- began at the two instants, as a request in flight is. Returned by its replica when idle, or
-- by any replica's sweeper once `expires_at_s` has passed (the replica stopped renewing it).
CREATE TABLE leases (
    id TEXT PRIMARY KEY,
    member_id BIGINT NOT NULL REFERENCES members(id),
    session_started_at_s DOUBLE PRECISION,
    weekly_started_at_s DOUBLE PRECISION,
    amount_nanos BIGINT NOT NULL,
    expires_at_s DOUBLE PRECISION NOT NULL
);
CREATE INDEX leases_expiry ON leases (expires_at_s);

-- For each replica's local journal (identified by host and path), the number of its last
-- record whose statements are in the tables; written in the same transaction as they are.
CREATE TABLE journals_applied (
    journal TEXT PRIMARY KEY,
    seq BIGINT NOT NULL
);
