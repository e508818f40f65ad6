-- Faults switched on at run time, one per service and kind, and the chaos mode's settings.
CREATE TABLE faults (
    service       TEXT NOT NULL,
    kind          TEXT NOT NULL,     -- a FaultKind name: latency, error_rate, ...
    value         REAL NOT NULL,
    source        TEXT NOT NULL,     -- api or chaos
    set_at_ms     INTEGER NOT NULL,
    expires_at_ms INTEGER,           -- NULL: until turned off
    PRIMARY KEY (service, kind)
);

CREATE TABLE chaos (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    enabled     INTEGER NOT NULL,
    interval_ms INTEGER NOT NULL,
    max_active  INTEGER NOT NULL
);
