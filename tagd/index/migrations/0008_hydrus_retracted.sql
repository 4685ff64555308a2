-- Tags tagd itself deleted from Hydrus because they stopped being effective (a reindex with
-- stricter thresholds, a blacklist). Hydrus keeps a deletion record for them like for a
-- human's deletion; this list tells them apart, so they may be added again if they return.
ALTER TABLE hydrus_pushed ADD COLUMN retracted TEXT NOT NULL DEFAULT '[]';
