-- Locks functions take with nango.tryAcquireLock({key, ttlMs}): one owner (a run) per
-- key in an environment until it releases it, its run ends, or `expires_at` passes.
CREATE TABLE function_locks (
    environment_id BIGINT NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    lock_key       TEXT NOT NULL,
    owner          TEXT NOT NULL,
    expires_at     TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (environment_id, lock_key)
);
CREATE INDEX function_locks_by_owner ON function_locks (owner);
