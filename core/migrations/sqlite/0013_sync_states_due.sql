-- The reconciler's ticks between full passes read only the states that are due.
CREATE INDEX sync_states_by_next_run ON sync_states (next_run_at);
CREATE INDEX sync_states_triggered ON sync_states (environment_id) WHERE pending_trigger IS NOT NULL;
