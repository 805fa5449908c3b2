-- Why: money safety. A job fails when its operation's answers cannot be read (the poll
-- endpoint answered malformed bodies --max-faults times), although the operation may still be
-- running, and billed. `runner retry` then sent the job again: paid twice, reported nowhere.
-- The mark says the failed job's operation was never seen to end; a retry polls that
-- operation again instead of sending the job again (an expired one is resubmitted as usual).
ALTER TABLE jobs ADD COLUMN op_unfinished INTEGER NOT NULL DEFAULT 0;
