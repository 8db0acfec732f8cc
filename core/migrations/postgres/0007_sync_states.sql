-- Scheduled exec runs: one row per (sync, connection), made by the reconciler or the
-- sync control API. `last_slot` is the last schedule slot handed out (replicas claim a
-- slot by moving it on, so each slot runs once); `run_id` and `running_until` (epoch
-- milliseconds, extended while the run lives) hold a run so that two never overlap.
CREATE TABLE sync_states (
    environment_id  BIGINT NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    integration     TEXT NOT NULL,
    sync_name       TEXT NOT NULL,
    connection_id   TEXT NOT NULL,
    started         BOOLEAN NOT NULL,
    paused          BOOLEAN NOT NULL DEFAULT FALSE,
    last_slot       BIGINT NOT NULL DEFAULT -1,
    next_run_at     TIMESTAMPTZ,
    run_id          TEXT,
    running_until   BIGINT,
    last_started_at TIMESTAMPTZ,
    last_ended_at   TIMESTAMPTZ,
    last_outcome    TEXT,
    last_result     TEXT,
    last_error      TEXT,
    checkpoint      TEXT,
    -- A trigger asked for through the API ({"token", "reset", "emptyCache"}), until the
    -- reconciler has queued it.
    pending_trigger TEXT,
    PRIMARY KEY (environment_id, integration, sync_name, connection_id)
);
