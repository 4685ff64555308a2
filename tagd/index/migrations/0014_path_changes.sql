-- Which paths a file has (and whether they are present) is part of what caches beside the
-- database hold: the posting-list bitmaps count present paths (tagd/bitmaps.py). A path
-- that appears, disappears, comes back or is pointed at another file logs the files
-- concerned in `score_changes`, so those caches take them from SQLite until patched.
-- Only file_id and missing are watched: rescans that touch size, mtime or last_seen log
-- nothing.
CREATE TRIGGER paths_log_insert AFTER INSERT ON paths WHEN NEW.file_id IS NOT NULL BEGIN
    DELETE FROM score_changes WHERE file_id = NEW.file_id;
    INSERT INTO score_changes(file_id) VALUES (NEW.file_id);
END;

CREATE TRIGGER paths_log_update AFTER UPDATE OF file_id, missing ON paths
WHEN OLD.file_id IS NOT NEW.file_id OR OLD.missing IS NOT NEW.missing BEGIN
    DELETE FROM score_changes WHERE file_id IN (OLD.file_id, NEW.file_id);
    INSERT INTO score_changes(file_id) SELECT OLD.file_id WHERE OLD.file_id IS NOT NULL;
    INSERT INTO score_changes(file_id) SELECT NEW.file_id
        WHERE NEW.file_id IS NOT NULL AND NEW.file_id IS NOT OLD.file_id;
END;

CREATE TRIGGER paths_log_delete AFTER DELETE ON paths WHEN OLD.file_id IS NOT NULL BEGIN
    DELETE FROM score_changes WHERE file_id = OLD.file_id;
    INSERT INTO score_changes(file_id) VALUES (OLD.file_id);
END;
