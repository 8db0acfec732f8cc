-- Moves on with every change to an integration's connections (created, deleted,
-- metadata written), in the same transaction: the router checks it before using its
-- cached connections, so a deleted connection is never matched again.
ALTER TABLE integrations ADD COLUMN connections_version INTEGER NOT NULL DEFAULT 0;
