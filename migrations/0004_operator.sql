-- Why: what an operator asks of a running batch. Cost needs tokens per model (prices differ
-- by model), kept by a trigger so `status` stays O(models), not O(jobs); `retry` moves jobs
-- back to pending and must keep what happened before, so each retried outcome is copied to
-- job_history first.
ALTER TABLE jobs ADD COLUMN model TEXT;
UPDATE jobs SET model = json_extract(COALESCE(origin, body), '$.modelUri');

CREATE TABLE usage_by_model (
    model TEXT PRIMARY KEY,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens INTEGER NOT NULL DEFAULT 0
);

INSERT INTO usage_by_model
SELECT model, SUM(input_tokens), SUM(completion_tokens), SUM(reasoning_tokens), SUM(total_tokens)
FROM jobs WHERE total_tokens != 0 GROUP BY model;

CREATE TRIGGER jobs_model_usage AFTER UPDATE OF total_tokens ON jobs
WHEN NEW.total_tokens != OLD.total_tokens
BEGIN
    INSERT OR IGNORE INTO usage_by_model (model) VALUES (NEW.model);
    UPDATE usage_by_model SET
        input_tokens = input_tokens + NEW.input_tokens - OLD.input_tokens,
        completion_tokens = completion_tokens + NEW.completion_tokens - OLD.completion_tokens,
        reasoning_tokens = reasoning_tokens + NEW.reasoning_tokens - OLD.reasoning_tokens,
        total_tokens = total_tokens + NEW.total_tokens - OLD.total_tokens
    WHERE model = NEW.model;
END;

CREATE TABLE job_history (
    job INTEGER NOT NULL REFERENCES jobs (rowid),
    at REAL NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    operation_id TEXT,
    error TEXT,
    result TEXT
);
CREATE INDEX job_history_job ON job_history (job);
