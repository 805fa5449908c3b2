-- Why: never touch a file runner did not write. `retry` marks every run output for a rebuild
-- (results changed after they were written), and used to do it by setting last_seq to -1. That
-- lost how far the file had got, so the next run could no longer tell lines added by hand past
-- the last commit from a crash's uncommitted tail, and cut them when it rebuilt the file. The
-- mark is a column of its own now; last_seq keeps its value, and what lies past the recorded
-- length is checked as on any other start. (Rows marked the old way keep last_seq -1: a file
-- longer than recorded is refused for them, since what follows cannot be checked.)
ALTER TABLE outputs ADD COLUMN rebuild INTEGER NOT NULL DEFAULT 0;
UPDATE outputs SET rebuild = 1 WHERE last_seq < 0;
