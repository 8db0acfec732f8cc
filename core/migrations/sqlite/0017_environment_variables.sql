-- An environment's variables, which functions read with nango.getEnvironmentVariables()
-- (as Nango's are set in its dashboard): a customer's own settings and secrets, so the
-- value is sealed like the other secrets.
CREATE TABLE environment_variables (
    environment_id INTEGER NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    name           TEXT NOT NULL,
    value          TEXT NOT NULL,
    PRIMARY KEY (environment_id, name)
);
