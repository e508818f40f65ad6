-- What retention by size (--max-db-size) has removed, counted in the same transaction as each
-- removal: one row, kept across restarts, so an eviction is never a silent loss.
CREATE TABLE evictions (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    traces        INTEGER NOT NULL,
    spans         INTEGER NOT NULL,
    metric_points INTEGER NOT NULL,
    log_records   INTEGER NOT NULL,
    first_ns      INTEGER,  -- when the first eviction happened
    before_ns     INTEGER   -- data that arrived before this time may be gone
);
INSERT INTO evictions VALUES (1, 0, 0, 0, 0, NULL, NULL);
