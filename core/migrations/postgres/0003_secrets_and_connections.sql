-- Secrets are sealed from now on (core/src/secrets.rs); an environment is found by the
-- SHA-256 of its secret key. Rows written before this migration hold plaintext keys
-- and no hash: Store::connect seals them once.
ALTER TABLE environments ADD COLUMN secret_key_hash TEXT;
CREATE UNIQUE INDEX environments_by_secret_key_hash ON environments (secret_key_hash);

ALTER TABLE integrations ADD COLUMN display_name TEXT;
ALTER TABLE integrations ADD COLUMN forward_webhooks BOOLEAN NOT NULL DEFAULT TRUE;

-- A customer account at a provider. Deleting keeps the row (deleted_at): a deleted
-- connection is never routed to again, and its id may be taken by a new connection.
CREATE TABLE connections (
    id                BIGSERIAL PRIMARY KEY,
    environment_id    BIGINT NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    integration_id    BIGINT NOT NULL REFERENCES integrations (id) ON DELETE CASCADE,
    connection_id     TEXT NOT NULL,
    connection_config JSONB NOT NULL,
    metadata          JSONB NOT NULL,
    tags              JSONB NOT NULL,
    credentials       TEXT,
    created_at        TIMESTAMPTZ NOT NULL,
    updated_at        TIMESTAMPTZ NOT NULL,
    deleted_at        TIMESTAMPTZ
);
CREATE UNIQUE INDEX connections_live ON connections (integration_id, connection_id) WHERE deleted_at IS NULL;
CREATE INDEX connections_by_environment ON connections (environment_id, id);
