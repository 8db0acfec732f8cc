-- Where events are forwarded. One row for the environment (integration and
-- connection_id empty) and one per connection that overrides it. A NULL signing key
-- means: the environment's (for a connection), the environment's secret key (for the
-- environment), so a client holding only the secret key can verify.
CREATE TABLE forwarding (
    environment_id BIGINT NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    integration    TEXT NOT NULL,
    connection_id  TEXT NOT NULL,
    urls           JSONB NOT NULL,
    signing_key    TEXT,
    always_notify  BOOLEAN NOT NULL DEFAULT FALSE,
    updated_at     TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (environment_id, integration, connection_id)
);

-- A destination that answered 410 Gone: nothing more is sent to it until it is set again.
CREATE TABLE disabled_destinations (
    environment_id BIGINT NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    url            TEXT NOT NULL,
    reason         TEXT NOT NULL,
    disabled_at    TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (environment_id, url)
);

-- Every delivery attempt, for the record and to count attempts across restarts.
CREATE TABLE delivery_attempts (
    id          BIGSERIAL PRIMARY KEY,
    delivery_id TEXT NOT NULL,
    environment TEXT NOT NULL,
    url         TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    at          TIMESTAMPTZ NOT NULL,
    status      INTEGER,
    latency_ms  INTEGER NOT NULL,
    error       TEXT
);
CREATE INDEX delivery_attempts_by_delivery ON delivery_attempts (delivery_id, id);
CREATE INDEX delivery_attempts_by_environment ON delivery_attempts (environment, id);
