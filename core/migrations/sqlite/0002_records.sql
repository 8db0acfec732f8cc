-- The records cache. One row per (environment, integration, connection, model, id).
-- `version` orders writes (positions in HOOKS_RAW); `seq` orders changes within a scope
-- for paging and is handed out under the scope's row lock, so a reader never sees a
-- higher seq before a lower one commits.
-- `scope` repeats the first four key columns as one value for the paging index only:
-- lookups by id filter on the key columns, which no other index carries, so the planner
-- cannot pick the paging index for them (it does, on a table not yet analyzed).
CREATE TABLE records (
    environment_id   INTEGER NOT NULL,
    integration      TEXT NOT NULL,
    connection_id    TEXT NOT NULL,
    model            TEXT NOT NULL,
    id               TEXT NOT NULL,
    payload          TEXT NOT NULL,
    hash             TEXT NOT NULL,
    version          INTEGER NOT NULL,
    seq              INTEGER NOT NULL,
    last_action      TEXT NOT NULL,
    first_seen_at    TEXT NOT NULL,
    last_modified_at TEXT NOT NULL,
    deleted_at       TEXT,
    scope            TEXT NOT NULL,
    PRIMARY KEY (environment_id, integration, connection_id, model, id)
);
CREATE INDEX records_by_seq ON records (scope, seq);

CREATE TABLE record_scopes (
    environment_id INTEGER NOT NULL,
    integration    TEXT NOT NULL,
    connection_id  TEXT NOT NULL,
    model          TEXT NOT NULL,
    last_seq       INTEGER NOT NULL,
    PRIMARY KEY (environment_id, integration, connection_id, model)
);
