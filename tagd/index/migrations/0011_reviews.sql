-- Human review of tags (issue #11): a person's verdict on a tag for a file, kept apart from
-- the models' `scores` so no retag or reindex ever rewrites it. +1 = the tag applies (an
-- accepted suggestion or a tag the models missed), -1 = it does not (a rejected suggestion).
CREATE TABLE reviews (
    file_id     INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    tag_id      INTEGER NOT NULL REFERENCES tags(id),
    verdict     INTEGER NOT NULL CHECK (verdict IN (-1, 1)),
    at          REAL    NOT NULL,
    by          TEXT    NOT NULL,
    PRIMARY KEY (file_id, tag_id)
) WITHOUT ROWID;
CREATE INDEX reviews_by_tag ON reviews(tag_id, verdict, file_id);

-- A verdict changes the file's effective tags: log it like a tagging, so caches kept beside
-- the database (ranking cache, sidecar and Hydrus sync digests) see the file as changed.
CREATE TRIGGER reviews_log_insert AFTER INSERT ON reviews BEGIN
    DELETE FROM score_changes WHERE file_id = NEW.file_id;
    INSERT INTO score_changes(file_id) VALUES (NEW.file_id);
END;

CREATE TRIGGER reviews_log_update AFTER UPDATE ON reviews BEGIN
    DELETE FROM score_changes WHERE file_id = NEW.file_id;
    INSERT INTO score_changes(file_id) VALUES (NEW.file_id);
END;

CREATE TRIGGER reviews_log_delete AFTER DELETE ON reviews BEGIN
    DELETE FROM score_changes WHERE file_id = OLD.file_id;
    INSERT INTO score_changes(file_id) VALUES (OLD.file_id);
END;

-- The web grid of an empty query lists images newest first without sorting every path.
CREATE INDEX paths_mtime ON paths(mtime_ns);
