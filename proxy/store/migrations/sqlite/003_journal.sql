-- The number of the last line of the write-behind journal (proxy/store/journal.py) whose
-- statements are in the tables; written in the same transaction as they are.
CREATE TABLE journal_applied (seq INTEGER NOT NULL);
INSERT INTO journal_applied (seq) VALUES (0);
