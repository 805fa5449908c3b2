-- Why: `runner status` must answer in well under a second on a million jobs. Counting states
-- is an index-only scan of jobs_state_next, but summing tokens and counters scanned the whole
-- table (0.7 s at 1M rows); a one-row table kept current by triggers makes that O(1).
CREATE TABLE totals (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    input_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL,
    ambiguous INTEGER NOT NULL,
    resubmits INTEGER NOT NULL,
    faults INTEGER NOT NULL,
    attempts INTEGER NOT NULL
);

INSERT INTO totals
SELECT 1, COALESCE(SUM(input_tokens), 0), COALESCE(SUM(completion_tokens), 0),
       COALESCE(SUM(reasoning_tokens), 0), COALESCE(SUM(total_tokens), 0),
       COALESCE(SUM(ambiguous), 0), COALESCE(SUM(resubmits), 0), COALESCE(SUM(faults), 0),
       COALESCE(SUM(attempts), 0)
FROM jobs;

CREATE TRIGGER jobs_totals_update
AFTER UPDATE OF input_tokens, completion_tokens, reasoning_tokens, total_tokens,
                ambiguous, resubmits, faults, attempts ON jobs
BEGIN
    UPDATE totals SET
        input_tokens = input_tokens + NEW.input_tokens - OLD.input_tokens,
        completion_tokens = completion_tokens + NEW.completion_tokens - OLD.completion_tokens,
        reasoning_tokens = reasoning_tokens + NEW.reasoning_tokens - OLD.reasoning_tokens,
        total_tokens = total_tokens + NEW.total_tokens - OLD.total_tokens,
        ambiguous = ambiguous + NEW.ambiguous - OLD.ambiguous,
        resubmits = resubmits + NEW.resubmits - OLD.resubmits,
        faults = faults + NEW.faults - OLD.faults,
        attempts = attempts + NEW.attempts - OLD.attempts
    WHERE id = 1;
END;

-- ingest inserts zeros; the WHEN keeps a million-row ingest from paying for this trigger
CREATE TRIGGER jobs_totals_insert AFTER INSERT ON jobs
WHEN NEW.total_tokens + NEW.input_tokens + NEW.completion_tokens + NEW.reasoning_tokens
     + NEW.ambiguous + NEW.resubmits + NEW.faults + NEW.attempts != 0
BEGIN
    UPDATE totals SET
        input_tokens = input_tokens + NEW.input_tokens,
        completion_tokens = completion_tokens + NEW.completion_tokens,
        reasoning_tokens = reasoning_tokens + NEW.reasoning_tokens,
        total_tokens = total_tokens + NEW.total_tokens,
        ambiguous = ambiguous + NEW.ambiguous,
        resubmits = resubmits + NEW.resubmits,
        faults = faults + NEW.faults,
        attempts = attempts + NEW.attempts
    WHERE id = 1;
END;

CREATE TRIGGER jobs_totals_delete AFTER DELETE ON jobs
BEGIN
    UPDATE totals SET
        input_tokens = input_tokens - OLD.input_tokens,
        completion_tokens = completion_tokens - OLD.completion_tokens,
        reasoning_tokens = reasoning_tokens - OLD.reasoning_tokens,
        total_tokens = total_tokens - OLD.total_tokens,
        ambiguous = ambiguous - OLD.ambiguous,
        resubmits = resubmits - OLD.resubmits,
        faults = faults - OLD.faults,
        attempts = attempts - OLD.attempts
    WHERE id = 1;
END;
