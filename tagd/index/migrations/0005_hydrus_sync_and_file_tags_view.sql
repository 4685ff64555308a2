-- Hydrus sync state, and a browsable view of effective tags for Datasette / sqlite-utils users.

-- Per (file, Hydrus tag service): what tagd last decided and what it has ever added there.
-- `pushed` (JSON list) is never re-added once a human removes it in Hydrus; `desired_hash`
-- lets a sync skip files whose effective tags have not changed since the last check.
CREATE TABLE hydrus_pushed (
    file_id       INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    service_key   TEXT    NOT NULL,
    known         INTEGER NOT NULL,
    desired_hash  TEXT    NOT NULL,
    pushed        TEXT    NOT NULL DEFAULT '[]',
    checked_at    REAL    NOT NULL,
    PRIMARY KEY (file_id, service_key)
) WITHOUT ROWID;

CREATE VIEW file_tags AS
SELECT p.path AS path, f.sha256 AS sha256, m.name AS model, t.namespace AS namespace,
       t.name AS tag, s.score AS score
FROM paths p
JOIN files f ON f.id = p.file_id
JOIN scores s ON s.file_id = f.id AND s.selected = 1
JOIN tags t ON t.id = s.tag_id
JOIN models m ON m.id = s.model_id
WHERE p.missing = 0;

-- Sidecars tagd wrote, with the SHA-256 of their content: a sidecar whose content still
-- matches is tagd's to replace; any other existing sidecar is the user's and is left alone.
CREATE TABLE sidecars (
    path        TEXT PRIMARY KEY,
    content_sha TEXT NOT NULL,
    written_at  REAL NOT NULL
) WITHOUT ROWID;
