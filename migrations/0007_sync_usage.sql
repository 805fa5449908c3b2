-- Why: cost. Synchronous requests cost twice the asynchronous price, and `runner status` priced
-- every token at the asynchronous one: the database did not say which tokens were synchronous
-- (a database can hold both: a batch resumed with another --mode). A synchronous answer is the
-- ledger row with an answer and no operation id; its tokens are counted per model here too, so
-- the cost can price them at the synchronous rate whatever mode the reader runs in.
ALTER TABLE usage_by_model ADD COLUMN sync_tokens INTEGER NOT NULL DEFAULT 0;

INSERT OR IGNORE INTO usage_by_model (model)
SELECT DISTINCT j.model FROM operations o JOIN jobs j ON j.rowid = o.job
WHERE o.operation_id IS NULL AND o.answered_at IS NOT NULL AND o.total_tokens != 0;

UPDATE usage_by_model SET sync_tokens = (
    SELECT COALESCE(SUM(o.total_tokens), 0) FROM operations o JOIN jobs j ON j.rowid = o.job
    WHERE o.operation_id IS NULL AND o.answered_at IS NOT NULL AND j.model IS usage_by_model.model
);

CREATE TRIGGER operations_sync_tokens_insert AFTER INSERT ON operations
WHEN NEW.operation_id IS NULL AND NEW.total_tokens != 0
BEGIN
    INSERT OR IGNORE INTO usage_by_model (model) SELECT model FROM jobs WHERE rowid = NEW.job;
    UPDATE usage_by_model SET sync_tokens = sync_tokens + NEW.total_tokens
    WHERE model IS (SELECT model FROM jobs WHERE rowid = NEW.job);
END;

CREATE TRIGGER operations_sync_tokens_update AFTER UPDATE OF total_tokens ON operations
WHEN NEW.operation_id IS NULL AND NEW.total_tokens != OLD.total_tokens
BEGIN
    INSERT OR IGNORE INTO usage_by_model (model) SELECT model FROM jobs WHERE rowid = NEW.job;
    UPDATE usage_by_model SET sync_tokens = sync_tokens + NEW.total_tokens - OLD.total_tokens
    WHERE model IS (SELECT model FROM jobs WHERE rowid = NEW.job);
END;
