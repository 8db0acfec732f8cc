-- The highest version written to each scope, raised by every write's reservation
-- (whether or not the write is newer than the stored record). With it every start
-- finds a HOOKS_RAW that is behind the records in one scan of the scopes, also when
-- the operation log, the other witness of the clock, has been pruned.
ALTER TABLE record_scopes ADD COLUMN max_version INTEGER NOT NULL DEFAULT 0;
-- One pass over the records (not one index range per scope).
UPDATE record_scopes SET max_version = r.v
FROM (SELECT environment_id, integration, connection_id, model, MAX(version) AS v
      FROM records GROUP BY environment_id, integration, connection_id, model) AS r
WHERE r.environment_id = record_scopes.environment_id AND r.integration = record_scopes.integration
  AND r.connection_id = record_scopes.connection_id AND r.model = record_scopes.model;
