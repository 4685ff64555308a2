-- A counter bumped by every change to `embeddings`, so the similarity index cached next to
-- the database can tell in O(1) whether it is stale (counting a million rows takes seconds).
INSERT OR IGNORE INTO state(key, value) VALUES ('embeddings.version', '0');

CREATE TRIGGER embeddings_version_insert AFTER INSERT ON embeddings BEGIN
    UPDATE state SET value = CAST(value AS INTEGER) + 1 WHERE key = 'embeddings.version';
END;

CREATE TRIGGER embeddings_version_update AFTER UPDATE ON embeddings BEGIN
    UPDATE state SET value = CAST(value AS INTEGER) + 1 WHERE key = 'embeddings.version';
END;

CREATE TRIGGER embeddings_version_delete AFTER DELETE ON embeddings BEGIN
    UPDATE state SET value = CAST(value AS INTEGER) + 1 WHERE key = 'embeddings.version';
END;
