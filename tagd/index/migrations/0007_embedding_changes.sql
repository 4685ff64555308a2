-- Embedding writes are logged in `score_changes` too, so the similarity index cached beside
-- the database can take in the files changed since it was built instead of rebuilding
-- (a million rows take a minute to read) while the daemon keeps tagging.
CREATE TRIGGER embeddings_log_insert AFTER INSERT ON embeddings BEGIN
    DELETE FROM score_changes WHERE file_id = NEW.file_id;
    INSERT INTO score_changes(file_id) VALUES (NEW.file_id);
END;

CREATE TRIGGER embeddings_log_update AFTER UPDATE ON embeddings BEGIN
    DELETE FROM score_changes WHERE file_id = NEW.file_id;
    INSERT INTO score_changes(file_id) VALUES (NEW.file_id);
END;

CREATE TRIGGER embeddings_log_delete AFTER DELETE ON embeddings BEGIN
    DELETE FROM score_changes WHERE file_id = OLD.file_id;
    INSERT INTO score_changes(file_id) VALUES (OLD.file_id);
END;
