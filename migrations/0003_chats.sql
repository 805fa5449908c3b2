-- Why: multi-turn chats. A conversation is one job whose turns run as successive operations.
-- `body` always holds the exact request of the current turn (the whole history so far), so a
-- crash resumes at the unfinished turn without re-running earlier ones; `transcript` keeps the
-- finished turns. `origin` keeps the first turn's body, which is what a rerun of the same
-- file is compared with (body moves on as turns finish).
ALTER TABLE jobs ADD COLUMN turns TEXT;
ALTER TABLE jobs ADD COLUMN turn INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN transcript TEXT;
ALTER TABLE jobs ADD COLUMN origin TEXT;
