-- One OAuth2 token refresh at a time per connection, across runs and processes: a
-- provider that rotates refresh tokens refuses the second use of one (some revoke the
-- whole grant), so the run holding the lease refreshes and the others wait for what it
-- stores. Storing the new token clears the lease; a holder that died leaves it until
-- `refresh_until`.
ALTER TABLE connections ADD COLUMN refresh_holder TEXT;
ALTER TABLE connections ADD COLUMN refresh_until TEXT;
