-- Actions triggered with `X-Async: true`: queued here, run by workers, their outcome kept
-- for `GET /action/{id}`. `run_after` is when a waiting run may start, and for a running
-- one when its lease ends (its worker died: another takes it up).
CREATE TABLE action_runs (
    id             TEXT PRIMARY KEY,
    environment_id INTEGER NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    environment    TEXT NOT NULL,
    integration    TEXT NOT NULL,
    connection_id  TEXT NOT NULL,
    action_name    TEXT NOT NULL,
    input          TEXT NOT NULL,
    max_retries    INTEGER NOT NULL,
    attempts       INTEGER NOT NULL DEFAULT 0,
    status         TEXT NOT NULL,
    run_after      TEXT NOT NULL,
    output         TEXT,
    error          TEXT,
    notified       INTEGER NOT NULL DEFAULT 0,
    created_at     TEXT NOT NULL,
    finished_at    TEXT
);
CREATE INDEX action_runs_due ON action_runs (run_after) WHERE status IN ('waiting', 'running');
CREATE INDEX action_runs_unnotified ON action_runs (finished_at) WHERE finished_at IS NOT NULL AND NOT notified;
CREATE INDEX action_runs_finished ON action_runs (finished_at);
