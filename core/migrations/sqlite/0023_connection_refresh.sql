-- One OAuth2 token refresh at a time per connection, across runs and processes: a
-- provider that rotates refresh tokens refuses the second use of one (some revoke the
-- whole grant), so the run holding the lease refreshes and the others wait for what it
-- stores. Storing the new token clears the lease; a holder that died leaves it until
-- `refresh_until`.
ALTER TABLE connections ADD COLUMN refresh_holder TEXT;
ALTER TABLE connections ADD COLUMN refresh_until TEXT;
-- A refresh the token URL refused (a revoked grant): shown on the connection until new
-- credentials are stored, and notified once to the forwarding destinations (an `auth`
-- webhook) by a worker's sweep, which sets `refresh_failure_notified_at`.
ALTER TABLE connections ADD COLUMN refresh_failed_at TEXT;
ALTER TABLE connections ADD COLUMN refresh_error TEXT;
ALTER TABLE connections ADD COLUMN refresh_failure_notified_at TEXT;
CREATE INDEX connections_refresh_failure_owed ON connections (id)
    WHERE refresh_failed_at IS NOT NULL AND refresh_failure_notified_at IS NULL;
-- Refresh tokens kept alive: some providers revoke one left unused for weeks, so a
-- worker refreshes each connection's token once a day at least. `refresh_check_at` is
-- when a worker next looks (set as credentials are stored; NULL: nothing to refresh).
-- Rows from before are looked at once, to find out.
ALTER TABLE connections ADD COLUMN refresh_check_at TEXT;
UPDATE connections SET refresh_check_at = created_at WHERE credentials IS NOT NULL AND deleted_at IS NULL;
CREATE INDEX connections_refresh_check ON connections (refresh_check_at)
    WHERE refresh_check_at IS NOT NULL AND deleted_at IS NULL;
-- Whether the environment's forwarding destinations get those `auth` webhooks.
ALTER TABLE forwarding ADD COLUMN auth_webhooks INTEGER NOT NULL DEFAULT 1;
