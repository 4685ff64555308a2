-- The classification head of each model (logits = embedding @ W + b), so reindex can
-- recompute every score of a file from its stored embedding without reading the image.
CREATE TABLE model_heads (
    model_id    INTEGER PRIMARY KEY REFERENCES models(id) ON DELETE CASCADE,
    revision    TEXT,
    dim         INTEGER NOT NULL,
    n_tags      INTEGER NOT NULL,
    weights     BLOB    NOT NULL,   -- float32 little-endian, [dim, n_tags] row-major
    bias        BLOB    NOT NULL,   -- float32 little-endian, [n_tags]
    updated_at  REAL    NOT NULL
);
