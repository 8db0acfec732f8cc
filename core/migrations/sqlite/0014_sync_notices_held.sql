-- An exec run's notice is written with each of its writes, while the run goes on; the
-- sweep leaves it alone until held_until (the run's lease), so only a run that died
-- has its notice sent by the sweep. NULL: a finished run's notice, sent at once.
ALTER TABLE sync_notices ADD COLUMN held_until TEXT;
