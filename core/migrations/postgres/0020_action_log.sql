-- The operation log's action runs: one row per run of an action (`POST /action/trigger`,
-- an asynchronous run's attempt, `nango.triggerAction`), written through the buffered
-- log writers; pruned after `logs.retention` with the webhooks' entries.
CREATE TABLE action_log (
    id             BIGSERIAL PRIMARY KEY,
    environment    TEXT NOT NULL,
    integration    TEXT NOT NULL,
    connection_id  TEXT NOT NULL,
    action_name    TEXT NOT NULL,
    origin         TEXT NOT NULL,
    run_id         TEXT,
    attempt        INTEGER,
    started_at     TIMESTAMPTZ NOT NULL,
    duration_ms    DOUBLE PRECISION NOT NULL,
    status         TEXT NOT NULL,
    error          TEXT,
    logs           TEXT NOT NULL
);
CREATE INDEX action_log_by_environment ON action_log (environment, id);
CREATE INDEX action_log_by_age ON action_log (started_at);
