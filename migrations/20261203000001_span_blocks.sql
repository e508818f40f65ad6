-- Spans move into compressed blocks (collector/src/store/blocks.rs): a transaction writes a few
-- block rows and one `trace_blocks` entry per trace and block instead of a row and three index
-- entries per span. The collector moves the rows of an older database's `spans` table into
-- blocks at start, in chunks and with progress in its log, then drops that table.
CREATE TABLE span_blocks (
    id        INTEGER PRIMARY KEY,
    start_min INTEGER NOT NULL,  -- earliest span start in the block
    start_max INTEGER NOT NULL,  -- latest span start in the block
    spans     INTEGER NOT NULL,
    summary   BLOB NOT NULL,     -- blocks::Summary: (service, name, kind) with statuses and longest duration; resources
    traces    BLOB NOT NULL,     -- the traces rows it holds with their span counts, varints
    bloom     BLOB,              -- blocks::Bloom of its attribute pairs (NULL: not known)
    data      BLOB NOT NULL      -- the spans, column by column, zstd
);
CREATE INDEX span_blocks_start_max ON span_blocks (start_max);
-- Retention finds the blocks that straddle its cutoff.
CREATE INDEX span_blocks_start_min ON span_blocks (start_min);

CREATE TABLE trace_blocks (
    trace INTEGER NOT NULL,  -- traces.id
    block INTEGER NOT NULL,  -- span_blocks.id
    PRIMARY KEY (trace, block)
) WITHOUT ROWID;

-- Spans stored of the trace row (kept with every transaction that adds some).
ALTER TABLE traces ADD COLUMN spans INTEGER NOT NULL DEFAULT 0;

-- The span metrics cover the blocks up to this one (spans_rowid did the same for `spans`).
ALTER TABLE red_state ADD COLUMN block INTEGER NOT NULL DEFAULT 0;

-- Only the move reads `spans` from now on, by rowid.
DROP INDEX IF EXISTS spans_service_start;
DROP INDEX IF EXISTS spans_trace_start;

-- Hourly roll-ups of the span metrics' minutes (collector/src/store/rollup.rs): a window of many
-- hours reads one row per series and whole hour instead of sixty.
CREATE TABLE red_hours (
    hour            INTEGER NOT NULL,  -- minute / 60
    series          INTEGER NOT NULL,  -- red_series.id
    calls           INTEGER NOT NULL,
    errors          INTEGER NOT NULL,
    duration_sum_ns INTEGER NOT NULL,
    sketch          BLOB NOT NULL,
    PRIMARY KEY (hour, series)
) WITHOUT ROWID;

-- Rolled-up hours whose minutes changed since (spans that came late): read from the minutes
-- until they are rolled up again.
CREATE TABLE red_hours_dirty (
    hour INTEGER PRIMARY KEY
);

-- The hours from hours_from up to (not including) hours_through are rolled up (0: not started).
ALTER TABLE red_state ADD COLUMN hours_from INTEGER NOT NULL DEFAULT 0;
ALTER TABLE red_state ADD COLUMN hours_through INTEGER NOT NULL DEFAULT 0;
