-- Switchyard collector schema. Applied at start by the collector; never changed in place:
-- every later change is a new file in this folder.
--
-- Repeated strings live once in `strings` and are referred to by id; attribute lists, events and
-- links are stored in the compact encoding of collector::store::codec. Timestamps are Unix
-- nanoseconds stored as INTEGER (u64 bit patterns).

CREATE TABLE strings (
    id    INTEGER PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE resources (
    id                       INTEGER PRIMARY KEY,
    service                  INTEGER NOT NULL,  -- strings.id of service.name
    attributes               BLOB NOT NULL,
    dropped_attributes_count INTEGER NOT NULL,
    schema_url               TEXT NOT NULL
);

CREATE TABLE scopes (
    id                       INTEGER PRIMARY KEY,
    name                     TEXT NOT NULL,
    version                  TEXT NOT NULL,
    attributes               BLOB NOT NULL,
    dropped_attributes_count INTEGER NOT NULL,
    schema_url               TEXT NOT NULL
);

-- One row per trace id and period of arrival; spans point here instead of repeating the trace id.
CREATE TABLE traces (
    id            INTEGER PRIMARY KEY,
    trace_id      BLOB NOT NULL,
    first_seen_ns INTEGER NOT NULL
);
CREATE INDEX traces_trace_id ON traces (trace_id);

CREATE TABLE spans (
    trace                    INTEGER NOT NULL,  -- traces.id
    span_id                  INTEGER NOT NULL,  -- 8 bytes, big-endian, as i64
    parent_span_id           INTEGER,           -- NULL for a root span
    service                  INTEGER NOT NULL,  -- strings.id, copied from the resource for search
    name                     INTEGER NOT NULL,  -- strings.id
    kind                     INTEGER NOT NULL,
    start_ns                 INTEGER NOT NULL,
    duration_ns              INTEGER NOT NULL,
    status_code              INTEGER NOT NULL,
    status_message           TEXT,
    resource                 INTEGER NOT NULL,
    scope                    INTEGER NOT NULL,
    trace_state              TEXT,
    flags                    INTEGER NOT NULL,
    attributes               BLOB,
    events                   BLOB,
    links                    BLOB,
    dropped_attributes_count INTEGER NOT NULL,
    dropped_events_count     INTEGER NOT NULL,
    dropped_links_count      INTEGER NOT NULL
);
CREATE INDEX spans_trace ON spans (trace);
CREATE INDEX spans_service_start ON spans (service, start_ns);

CREATE TABLE operations (
    service INTEGER NOT NULL,
    name    INTEGER NOT NULL,
    kind    INTEGER NOT NULL,
    PRIMARY KEY (service, name, kind)
) WITHOUT ROWID;

CREATE TABLE metrics (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    description TEXT NOT NULL,
    unit        TEXT NOT NULL,
    type        INTEGER NOT NULL,  -- 1 gauge, 2 sum, 3 histogram, 4 exponential histogram, 5 summary
    temporality INTEGER NOT NULL,
    monotonic   INTEGER NOT NULL,
    metadata    BLOB NOT NULL
);
CREATE INDEX metrics_name ON metrics (name);

CREATE TABLE metric_series (
    id         INTEGER PRIMARY KEY,
    metric     INTEGER NOT NULL,
    resource   INTEGER NOT NULL,
    scope      INTEGER NOT NULL,
    attributes BLOB NOT NULL
);
CREATE INDEX metric_series_metric ON metric_series (metric);

-- `value` holds a gauge or sum point's value; `data` the whole point as OTLP protobuf with its
-- attributes left out (they are the series'), which keeps histograms, exemplars and flags.
CREATE TABLE metric_points (
    series   INTEGER NOT NULL,
    start_ns INTEGER NOT NULL,
    time_ns  INTEGER NOT NULL,
    value    REAL,
    data     BLOB NOT NULL
);
CREATE INDEX metric_points_series_time ON metric_points (series, time_ns);
CREATE INDEX metric_points_time ON metric_points (time_ns);

CREATE TABLE logs (
    time_ns                  INTEGER NOT NULL,
    observed_ns              INTEGER NOT NULL,
    service                  INTEGER NOT NULL,
    severity_number          INTEGER NOT NULL,
    severity_text            TEXT NOT NULL,
    body                     BLOB,
    attributes               BLOB,
    trace_id                 BLOB,
    span_id                  BLOB,
    flags                    INTEGER NOT NULL,
    dropped_attributes_count INTEGER NOT NULL,
    event_name               TEXT NOT NULL,
    resource                 INTEGER NOT NULL,
    scope                    INTEGER NOT NULL
);
CREATE INDEX logs_service_time ON logs (service, time_ns);
CREATE INDEX logs_trace ON logs (trace_id) WHERE trace_id IS NOT NULL;
