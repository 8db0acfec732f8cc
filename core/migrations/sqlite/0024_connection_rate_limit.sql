-- A provider's rate limit on a connection, until when: written by the process whose
-- call met it, read with the connection by every other, so that the workers of a
-- scaled-out deployment all hold its calls (each learnt of it by its own refused call
-- before).
ALTER TABLE connections ADD COLUMN rate_limited_until TEXT;
