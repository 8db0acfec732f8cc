-- `GET /action/runs` lists an environment's asynchronous runs, newest first.
CREATE INDEX action_runs_listed ON action_runs (environment_id, created_at, id);
