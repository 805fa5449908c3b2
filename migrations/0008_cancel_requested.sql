-- Why: money safety. `runner cancel` asks the server to cancel running operations, but the
-- service may refuse or ignore it (completions are probably not cancellable), so those jobs stay
-- `running` for a later run to collect their (paid) answers. Nothing recorded that the user had
-- cancelled them: a chat's answer then queued its next turn, and the next run paid for every
-- remaining turn of every chat the user had cancelled. The mark makes a collected answer finish
-- the job instead: a plain job is done (it is paid for), a chat stops as `cancelled` after the
-- answered turn, and nothing is sent again for it (not even after an operation expires).
ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
