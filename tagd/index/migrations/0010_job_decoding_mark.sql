-- When a worker started decoding this job's file (NULL: not being decoded). A lease taken
-- back from a dead or stalled tagd charges an attempt only to the jobs that carry this mark,
-- so a file that kills or hangs its decoder ends failed after max_attempts, and the files
-- leased next to it go back to the queue uncharged.
ALTER TABLE jobs ADD COLUMN decoding_since REAL;
