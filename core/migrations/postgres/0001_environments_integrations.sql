CREATE TABLE environments (
    id                  BIGSERIAL PRIMARY KEY,
    name                TEXT NOT NULL UNIQUE,
    webhook_id          TEXT NOT NULL UNIQUE,
    secret_key          TEXT NOT NULL,
    webhook_signing_key TEXT NOT NULL,
    created_at          TIMESTAMPTZ NOT NULL
);

CREATE TABLE integrations (
    id             BIGSERIAL PRIMARY KEY,
    environment_id BIGINT NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    unique_key     TEXT NOT NULL,
    provider       TEXT NOT NULL,
    webhook_secret TEXT,
    settings       JSONB NOT NULL DEFAULT '{}',
    created_at     TIMESTAMPTZ NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL,
    UNIQUE (environment_id, unique_key)
);
