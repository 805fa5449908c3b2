-- Why: money safety. Outcomes used to carry only a row id, so a late or repeated answer was
-- applied to whatever the row held by then (a duplicate poll wrote turn k's answer into turn
-- k+1), and tokens reached the totals only when a whole job finished (a chat failing at turn 2
-- reported nothing for the paid turn 1).
--
-- `fence` is the fencing token: the number of the job's current attempt, bumped by every claim
-- and never reused. Every outcome carries it (and the operation id, once there is one) and every
-- UPDATE requires it, so a stale outcome changes nothing; it is counted in totals.stale.
--
-- `operations` is the ledger of every submit that may have reached the server: one row per
-- accepted operation, per ambiguous submit (the answer was lost) and per synchronous request.
-- Tokens are counted here, once per operation, the moment its answer arrives, whatever becomes
-- of the job; an answer that arrives for an attempt that is no longer current is kept in
-- `orphan` rather than dropped. The hourly submit window is rebuilt from `sent_at` on start.
ALTER TABLE jobs ADD COLUMN fence INTEGER NOT NULL DEFAULT 0;
UPDATE jobs SET fence = attempts;
-- `retry` gives a job a fresh budget without rewinding the counters `status` reports: the budget
-- used is the counter minus its base
ALTER TABLE jobs ADD COLUMN faults_base INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN resubmits_base INTEGER NOT NULL DEFAULT 0;
UPDATE jobs SET faults_base = faults;

CREATE TABLE operations (
    seq INTEGER PRIMARY KEY,
    job INTEGER NOT NULL REFERENCES jobs (rowid),
    fence INTEGER NOT NULL,
    turn INTEGER NOT NULL DEFAULT 0,
    operation_id TEXT,
    sent_at REAL NOT NULL,
    ambiguous INTEGER NOT NULL DEFAULT 0,
    answered_at REAL,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens INTEGER NOT NULL DEFAULT 0,
    orphan TEXT
);
CREATE UNIQUE INDEX operations_id ON operations (operation_id) WHERE operation_id IS NOT NULL;
-- a synchronous answer has no operation id: it is the answer of its attempt, recorded once
CREATE UNIQUE INDEX operations_sync ON operations (job, fence)
    WHERE operation_id IS NULL AND answered_at IS NOT NULL;
CREATE INDEX operations_sent ON operations (sent_at);
CREATE INDEX operations_job ON operations (job);

-- what earlier versions recorded, so the ledger is complete; their tokens are already in totals,
-- and the trigger that counts tokens is created only after this insert
INSERT INTO operations (job, fence, turn, operation_id, sent_at, answered_at, input_tokens,
                        completion_tokens, reasoning_tokens, total_tokens)
SELECT rowid, fence, turn, operation_id, COALESCE(submitted_at, 0), finished_at, input_tokens,
       completion_tokens, reasoning_tokens, total_tokens
FROM jobs WHERE operation_id IS NOT NULL;

ALTER TABLE totals ADD COLUMN polls INTEGER NOT NULL DEFAULT 0;
ALTER TABLE totals ADD COLUMN stale INTEGER NOT NULL DEFAULT 0;
UPDATE totals SET polls = (SELECT COALESCE(SUM(polls), 0) FROM jobs);

-- per-job counters still roll up into totals; tokens no longer come from jobs
DROP TRIGGER jobs_totals_update;
DROP TRIGGER jobs_totals_insert;
DROP TRIGGER jobs_totals_delete;
DROP TRIGGER jobs_model_usage;

CREATE TRIGGER jobs_counters_update
AFTER UPDATE OF ambiguous, resubmits, faults, attempts, polls ON jobs
BEGIN
    UPDATE totals SET
        ambiguous = ambiguous + NEW.ambiguous - OLD.ambiguous,
        resubmits = resubmits + NEW.resubmits - OLD.resubmits,
        faults = faults + NEW.faults - OLD.faults,
        attempts = attempts + NEW.attempts - OLD.attempts,
        polls = polls + NEW.polls - OLD.polls
    WHERE id = 1;
END;

CREATE TRIGGER operations_tokens_insert AFTER INSERT ON operations
WHEN NEW.total_tokens + NEW.input_tokens + NEW.completion_tokens + NEW.reasoning_tokens != 0
BEGIN
    UPDATE totals SET
        input_tokens = input_tokens + NEW.input_tokens,
        completion_tokens = completion_tokens + NEW.completion_tokens,
        reasoning_tokens = reasoning_tokens + NEW.reasoning_tokens,
        total_tokens = total_tokens + NEW.total_tokens
    WHERE id = 1;
    INSERT OR IGNORE INTO usage_by_model (model) SELECT model FROM jobs WHERE rowid = NEW.job;
    UPDATE usage_by_model SET
        input_tokens = input_tokens + NEW.input_tokens,
        completion_tokens = completion_tokens + NEW.completion_tokens,
        reasoning_tokens = reasoning_tokens + NEW.reasoning_tokens,
        total_tokens = total_tokens + NEW.total_tokens
    WHERE model = (SELECT model FROM jobs WHERE rowid = NEW.job);
END;

CREATE TRIGGER operations_tokens_update
AFTER UPDATE OF input_tokens, completion_tokens, reasoning_tokens, total_tokens ON operations
BEGIN
    UPDATE totals SET
        input_tokens = input_tokens + NEW.input_tokens - OLD.input_tokens,
        completion_tokens = completion_tokens + NEW.completion_tokens - OLD.completion_tokens,
        reasoning_tokens = reasoning_tokens + NEW.reasoning_tokens - OLD.reasoning_tokens,
        total_tokens = total_tokens + NEW.total_tokens - OLD.total_tokens
    WHERE id = 1;
    INSERT OR IGNORE INTO usage_by_model (model) SELECT model FROM jobs WHERE rowid = NEW.job;
    UPDATE usage_by_model SET
        input_tokens = input_tokens + NEW.input_tokens - OLD.input_tokens,
        completion_tokens = completion_tokens + NEW.completion_tokens - OLD.completion_tokens,
        reasoning_tokens = reasoning_tokens + NEW.reasoning_tokens - OLD.reasoning_tokens,
        total_tokens = total_tokens + NEW.total_tokens - OLD.total_tokens
    WHERE model = (SELECT model FROM jobs WHERE rowid = NEW.job);
END;

-- Output files: `tail` fingerprints the last bytes runner wrote, so a file edited by hand is
-- noticed instead of cut back; `kind` tells a run's live output from a one-off export.
ALTER TABLE outputs ADD COLUMN tail TEXT NOT NULL DEFAULT '';
ALTER TABLE outputs ADD COLUMN kind TEXT NOT NULL DEFAULT 'run';

-- Small facts about the live run that other processes (`runner status`) show: the outage
-- breaker's state, mostly. One row per key, JSON values.
CREATE TABLE run_state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    at REAL NOT NULL
);
