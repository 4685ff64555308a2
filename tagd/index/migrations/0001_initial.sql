-- tagd schema v1: hydrus-style. A file is its content (sha256); paths point at files.

CREATE TABLE files (
    id          INTEGER PRIMARY KEY,
    sha256      TEXT    NOT NULL UNIQUE,
    size        INTEGER NOT NULL,
    width       INTEGER,
    height      INTEGER,
    format      TEXT,
    first_seen  REAL    NOT NULL
);

CREATE TABLE paths (
    id          INTEGER PRIMARY KEY,
    path        TEXT    NOT NULL UNIQUE,
    file_id     INTEGER REFERENCES files(id) ON DELETE SET NULL,
    size        INTEGER,
    mtime_ns    INTEGER,
    missing     INTEGER NOT NULL DEFAULT 0,
    last_seen   REAL
);
CREATE INDEX paths_file ON paths(file_id);

CREATE TABLE models (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    family      TEXT    NOT NULL,
    source      TEXT    NOT NULL,
    revision    TEXT,
    n_tags      INTEGER,
    settings    TEXT,
    updated_at  REAL    NOT NULL
);

CREATE TABLE tags (
    id          INTEGER PRIMARY KEY,
    namespace   TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    UNIQUE (name, namespace)
);
CREATE INDEX tags_namespace ON tags(namespace, name);

-- Which tag each output column of a model means.
CREATE TABLE model_tags (
    model_id    INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    idx         INTEGER NOT NULL,
    tag_id      INTEGER NOT NULL REFERENCES tags(id),
    PRIMARY KEY (model_id, idx)
) WITHOUT ROWID;

-- Every score at or above the model's floor; `selected` is the threshold decision,
-- recomputed by reindex without touching images.
CREATE TABLE scores (
    file_id     INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    model_id    INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    tag_id      INTEGER NOT NULL REFERENCES tags(id),
    score       REAL    NOT NULL,
    selected    INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (file_id, model_id, tag_id)
) WITHOUT ROWID;
CREATE INDEX scores_by_tag ON scores(tag_id, selected, score);

-- One row per (file, model) once that model has processed the file.
CREATE TABLE taggings (
    file_id     INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    model_id    INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    revision    TEXT,
    floor       REAL    NOT NULL,
    tagged_at   REAL    NOT NULL,
    PRIMARY KEY (file_id, model_id)
) WITHOUT ROWID;
CREATE INDEX taggings_model ON taggings(model_id, file_id);

CREATE TABLE embeddings (
    file_id     INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    model_id    INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    dim         INTEGER NOT NULL,
    dtype       TEXT    NOT NULL,
    vector      BLOB    NOT NULL,
    PRIMARY KEY (file_id, model_id)
);

-- The work queue: one row per path. `force_models` names models to re-run even when
-- they already tagged the content (comma-separated), NULL means "only what is missing".
CREATE TABLE jobs (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    path           TEXT    NOT NULL UNIQUE,
    state          TEXT    NOT NULL DEFAULT 'queued'
                   CHECK (state IN ('queued', 'running', 'done', 'failed')),
    priority       INTEGER NOT NULL DEFAULT 0,
    attempts       INTEGER NOT NULL DEFAULT 0,
    error          TEXT,
    size           INTEGER,
    mtime_ns       INTEGER,
    force_models   TEXT,
    not_before     REAL    NOT NULL DEFAULT 0,
    lease_owner    TEXT,
    lease_expires  REAL,
    created_at     REAL    NOT NULL,
    updated_at     REAL    NOT NULL
);
CREATE INDEX jobs_claim ON jobs(state, priority DESC, id);

-- Small persistent key/value state shared by daemon and CLI (pause flag, last error, ...).
CREATE TABLE state (
    key         TEXT PRIMARY KEY,
    value       TEXT
) WITHOUT ROWID;
