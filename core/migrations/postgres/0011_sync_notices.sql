-- The outbox of sync notifications: each is written in the transaction that commits its
-- run's record changes, then queued on HOOKS_FWD and deleted. One left here (its worker
-- died, or NATS was away) is queued by a worker's sweep.
CREATE TABLE sync_notices (
    key        TEXT PRIMARY KEY,
    notice     TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX sync_notices_by_age ON sync_notices (created_at);
