-- A log of which files' scores changed, so the ranking cache kept next to the database
-- (tagd/rankcache.py) knows which of its columns are stale without rescanning `scores`.
-- One row per file: its latest change. AUTOINCREMENT keeps `seq` from ever being reused, so
-- "changed after seq N" stays exact when a file changes again.
CREATE TABLE score_changes (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    file_id  INTEGER NOT NULL UNIQUE
);

-- Every tagging writes its `taggings` row in the same transaction as its scores, so logging
-- taggings rather than each score row costs one insert per file instead of one per tag.
-- Writers that change scores without touching taggings (reindex) log the file themselves.
-- DELETE + INSERT rather than INSERT OR REPLACE: an UPSERT on taggings would override a
-- trigger's conflict policy.
CREATE TRIGGER taggings_log_insert AFTER INSERT ON taggings BEGIN
    DELETE FROM score_changes WHERE file_id = NEW.file_id;
    INSERT INTO score_changes(file_id) VALUES (NEW.file_id);
END;

CREATE TRIGGER taggings_log_update AFTER UPDATE ON taggings BEGIN
    DELETE FROM score_changes WHERE file_id = NEW.file_id;
    INSERT INTO score_changes(file_id) VALUES (NEW.file_id);
END;

CREATE TRIGGER taggings_log_delete AFTER DELETE ON taggings BEGIN
    DELETE FROM score_changes WHERE file_id = OLD.file_id;
    INSERT INTO score_changes(file_id) VALUES (OLD.file_id);
END;

-- Identifies this database to caches kept beside it (a restored or swapped file is another).
INSERT OR IGNORE INTO state(key, value) VALUES ('db.id', lower(hex(randomblob(16))));
