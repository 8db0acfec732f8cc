-- Event functions owed a run: a connection's post-connection-creation, written with the
-- connection and deleted once its functions ran. The API that created the connection
-- holds it until `claimed_until` while it runs them; one whose claim ran out (that API
-- stopped or died) is taken and run by an API's sweep.
CREATE TABLE connection_events (
    environment   TEXT NOT NULL,
    integration   TEXT NOT NULL,
    connection_id TEXT NOT NULL,
    event         TEXT NOT NULL,
    claimed_until TEXT NOT NULL,
    PRIMARY KEY (environment, integration, connection_id, event)
);
CREATE INDEX connection_events_by_claim ON connection_events (claimed_until);
