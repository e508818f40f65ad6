-- Span-derived RED metrics (collector::store::red): per-minute aggregates of span series, written
-- in the same transaction as the spans they count.
--
-- kind 0: spans of an operation (service, operation, span_kind, status_code; flag = root span);
-- kind 1: calls between services (service = caller, callee; flag = through a broker);
-- kind 2: calls to a database or broker (service, peer_kind, peer);
-- kind 3: messages consumed from a broker (service = consumer, peer_kind, peer).
-- overflow = 1: the series that spans past the cap on series count under, one per kind.
CREATE TABLE red_series (
    id           INTEGER PRIMARY KEY,
    kind         INTEGER NOT NULL,
    overflow     INTEGER NOT NULL,
    service      INTEGER NOT NULL,  -- strings.id (0 for an overflow series)
    operation    INTEGER,           -- strings.id
    span_kind    INTEGER,
    status_code  INTEGER,
    flag         INTEGER,
    callee       INTEGER,           -- strings.id
    peer_kind    INTEGER,           -- 1 database, 2 broker
    peer         TEXT,
    last_seen_ns INTEGER NOT NULL
);
CREATE INDEX red_series_service ON red_series (service, kind);

-- `sketch`: the durations in logarithmic buckets (collector::store::sketch).
CREATE TABLE red_minutes (
    series          INTEGER NOT NULL,  -- red_series.id
    minute          INTEGER NOT NULL,  -- start time of the spans / 60 s
    calls           INTEGER NOT NULL,
    errors          INTEGER NOT NULL,
    duration_sum_ns INTEGER NOT NULL,
    sketch          BLOB NOT NULL,
    PRIMARY KEY (series, minute)
) WITHOUT ROWID;

-- How far the aggregates go: spans with a rowid above `spans_rowid` are not counted in them yet
-- (the writer writes aggregates at most once a second, with the spans of that transaction). At
-- start the collector counts those spans again from the table, so a crash loses nothing; on a
-- database from before span metrics, that is every span already stored.
CREATE TABLE red_state (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    spans_rowid INTEGER NOT NULL
);
INSERT INTO red_state VALUES (1, 0);
