-- Webhook functions. A deploy compiles a project's files once into a bundle (QuickJS
-- bytecode per module, tied to the engine that wrote it) and stores one row per sync
-- that is new or changed; the row it replaces is marked superseded. Workers load the
-- live rows (superseded_at IS NULL) and reload when function_deploys moves on.
CREATE TABLE function_bundles (
    hash       TEXT PRIMARY KEY,
    engine     TEXT NOT NULL,
    sources    JSONB NOT NULL,
    modules    JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE function_deploys (
    id             BIGSERIAL PRIMARY KEY,
    environment_id BIGINT NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    summary        JSONB NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL
);

CREATE TABLE functions (
    id             BIGSERIAL PRIMARY KEY,
    environment_id BIGINT NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    integration    TEXT NOT NULL,
    name           TEXT NOT NULL,
    version        INTEGER NOT NULL,
    bundle_hash    TEXT NOT NULL REFERENCES function_bundles (hash),
    entry          TEXT NOT NULL,
    code_hash      TEXT NOT NULL,
    config         JSONB NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL,
    superseded_at  TIMESTAMPTZ,
    UNIQUE (environment_id, integration, name, version)
);
CREATE UNIQUE INDEX functions_live ON functions (environment_id, integration, name) WHERE superseded_at IS NULL;

-- Idempotency markers: a consumer's message whose effects are committed. Written in the
-- transaction of those effects; pruned once the message cannot come back.
CREATE TABLE processed_messages (
    consumer     TEXT NOT NULL,
    message_id   TEXT NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX processed_messages_by_age ON processed_messages (processed_at);

-- Messages a consumer gave up on, with why, to list and redrive.
CREATE TABLE dead_letters (
    id               BIGSERIAL PRIMARY KEY,
    consumer         TEXT NOT NULL,
    environment      TEXT NOT NULL,
    integration      TEXT NOT NULL,
    connection_id    TEXT,
    subject          TEXT NOT NULL,
    message_id       TEXT NOT NULL,
    stream_seq       BIGINT NOT NULL,
    payload          TEXT NOT NULL,
    function_name    TEXT,
    function_version INTEGER,
    error_kind       TEXT NOT NULL,
    error            TEXT NOT NULL,
    attempts         INTEGER NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL
);
CREATE INDEX dead_letters_by_environment ON dead_letters (environment, id);
