-- Redriving dead letters: asked for through the API, done by the router (which
-- republishes the message under a new id). A letter stays listed, with how often it
-- was redriven; a redrive that fails again makes a new letter.
ALTER TABLE dead_letters ADD COLUMN redrive_requested_at TIMESTAMPTZ;
ALTER TABLE dead_letters ADD COLUMN redriven_at TIMESTAMPTZ;
ALTER TABLE dead_letters ADD COLUMN redrives INTEGER NOT NULL DEFAULT 0;
ALTER TABLE dead_letters ADD COLUMN redrive_error TEXT;
-- A function's event, as it was published (its headers; the payload is kept already), so
-- that it can be redriven however long ago its stream dropped it.
ALTER TABLE dead_letters ADD COLUMN headers TEXT;
CREATE INDEX dead_letters_redrive_requested ON dead_letters (redrive_requested_at) WHERE redrive_requested_at IS NOT NULL;

-- The failed attempts of function executions before they succeeded or were given up
-- on: what a dead letter shows as its history.
CREATE TABLE failed_attempts (
    consumer   TEXT NOT NULL,
    message_id TEXT NOT NULL,
    attempt    INTEGER NOT NULL,
    error_kind TEXT NOT NULL,
    error      TEXT NOT NULL,
    failed_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (consumer, message_id, attempt)
);
CREATE INDEX failed_attempts_by_age ON failed_attempts (failed_at);

-- Replays of HOOKS_RAW, asked for through the API and run by a router, which holds a
-- lease while it runs one and records how far it got (so another router can resume it).
CREATE TABLE replays (
    id               BIGSERIAL PRIMARY KEY,
    environment      TEXT NOT NULL,
    integration      TEXT,
    connection_id    TEXT,
    since            TIMESTAMPTZ NOT NULL,
    until            TIMESTAMPTZ NOT NULL,
    target           TEXT NOT NULL,
    dry_run          BOOLEAN NOT NULL,
    rate             INTEGER,
    status           TEXT NOT NULL,
    total            BIGINT,
    read             BIGINT NOT NULL DEFAULT 0,
    published        BIGINT NOT NULL DEFAULT 0,
    skipped          BIGINT NOT NULL DEFAULT 0,
    -- Held back while the workers have too much waiting.
    waiting          BOOLEAN NOT NULL DEFAULT FALSE,
    next_seq         BIGINT,
    end_seq          BIGINT,
    error            TEXT,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    lease_until      TIMESTAMPTZ,
    created_at       TIMESTAMPTZ NOT NULL,
    started_at       TIMESTAMPTZ,
    finished_at      TIMESTAMPTZ
);
CREATE INDEX replays_by_environment ON replays (environment, id);
