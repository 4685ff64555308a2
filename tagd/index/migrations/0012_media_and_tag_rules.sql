-- #13. Videos and animations: duration in seconds, frames in the stream and frame rate (NULL
-- for still images), searchable as duration:>30s, video, animated.
ALTER TABLE files ADD COLUMN duration REAL;
ALTER TABLE files ADD COLUMN frames INTEGER;
ALTER TABLE files ADD COLUMN fps REAL;

-- Danbooru aliases and implications imported with `tagd tags import-rules FILE`, applied
-- with the config's own `tags.aliases` / `tags.implications` (the config wins on conflicts).
CREATE TABLE tag_rules (
    kind        TEXT NOT NULL CHECK (kind IN ('alias', 'implication')),
    antecedent  TEXT NOT NULL,
    consequent  TEXT NOT NULL,
    source      TEXT,
    imported_at REAL NOT NULL,
    PRIMARY KEY (kind, antecedent, consequent)
) WITHOUT ROWID;
