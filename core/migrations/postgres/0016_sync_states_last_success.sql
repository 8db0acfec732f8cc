-- When the last successful run of a sync started: Nango's `lastSyncDate`, which an
-- incremental sync asks the provider for changes since. Set as a run ends in success;
-- a reset trigger clears it with the checkpoint.
ALTER TABLE sync_states ADD COLUMN last_success_started_at TIMESTAMPTZ;
-- Where the last run succeeded and none is going, that run's start is it.
UPDATE sync_states SET last_success_started_at = last_started_at
WHERE last_outcome = 'SUCCESS' AND run_id IS NULL;
