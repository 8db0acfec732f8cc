CREATE TABLE environments (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    name                TEXT NOT NULL UNIQUE,
    webhook_id          TEXT NOT NULL UNIQUE,
    secret_key          TEXT NOT NULL,
    webhook_signing_key TEXT NOT NULL,
    created_at          TEXT NOT NULL
);

CREATE TABLE integrations (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    environment_id INTEGER NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    unique_key     TEXT NOT NULL,
    provider       TEXT NOT NULL,
    webhook_secret TEXT,
    settings       TEXT NOT NULL DEFAULT '{}',
    created_at     TEXT NOT NULL,
    updated_at     TEXT NOT NULL,
    UNIQUE (environment_id, unique_key)
);
