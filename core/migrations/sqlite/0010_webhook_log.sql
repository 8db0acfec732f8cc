-- The operation log: one row per webhook that reached ingest (accepted ones written by
-- the router that routes them, the others by ingest), and the steps that followed an
-- accepted one (routing, each function execution, each forwarding attempt), joined by
-- the webhook's HOOKS_RAW sequence. Written through buffered writers off the hot path;
-- pruned after `logs.retention`.
CREATE TABLE webhook_log (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    environment TEXT NOT NULL,
    integration TEXT NOT NULL,
    raw_seq     BIGINT,
    delivery_id TEXT,
    received_at TEXT NOT NULL,
    status      TEXT NOT NULL,
    detail      TEXT,
    bytes       BIGINT NOT NULL,
    -- The router's routing of it: its first step, kept in the same row.
    routing     TEXT
);
CREATE INDEX webhook_log_by_environment ON webhook_log (environment, id);
-- One entry per stored webhook, however often its raw message is routed.
CREATE UNIQUE INDEX webhook_log_by_raw_seq ON webhook_log (raw_seq);
CREATE INDEX webhook_log_by_age ON webhook_log (received_at);

CREATE TABLE webhook_log_steps (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    raw_seq       BIGINT NOT NULL,
    at            TEXT NOT NULL,
    stage         TEXT NOT NULL,
    connection_id TEXT,
    status        TEXT NOT NULL,
    detail        TEXT NOT NULL
);
CREATE INDEX webhook_log_steps_by_raw_seq ON webhook_log_steps (raw_seq, id);
CREATE INDEX webhook_log_steps_by_age ON webhook_log_steps (at);
