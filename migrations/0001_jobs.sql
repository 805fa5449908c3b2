-- Why: the core state. One row per job, holding the exact request body, where the job is in its
-- life (state + next_at, indexed together because that is what the scheduler asks for), the
-- idempotency key committed before a submit, the operation id committed right after it, and the
-- normalised result. finish_seq orders finished jobs so an output file can be extended from
-- the last sequence number it holds; outputs records, per output file, how far it got and its
-- byte length, so a torn append is cut off on the next start.
CREATE TABLE jobs (
    rowid INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    line INTEGER NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'submitting', 'running', 'done', 'failed', 'cancelled')),
    next_at REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    faults INTEGER NOT NULL DEFAULT 0,
    ambiguous INTEGER NOT NULL DEFAULT 0,
    resubmits INTEGER NOT NULL DEFAULT 0,
    idem_key TEXT,
    operation_id TEXT,
    submitted_at REAL,
    polls INTEGER NOT NULL DEFAULT 0,
    finished_at REAL,
    finish_seq INTEGER,
    result TEXT,
    error TEXT,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX jobs_state_next ON jobs (state, next_at);
-- partial: unfinished jobs (most of a fresh batch) cost nothing in it
CREATE UNIQUE INDEX jobs_finished ON jobs (finish_seq) WHERE finish_seq IS NOT NULL;

CREATE TABLE outputs (
    path TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL DEFAULT 0
);
