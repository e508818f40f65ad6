-- The registry's state: instances with their leases, the change index, and the event log.
CREATE TABLE instances (
    instance_id           TEXT PRIMARY KEY,
    service               TEXT NOT NULL,
    address               TEXT NOT NULL,
    metadata              TEXT NOT NULL,          -- JSON object of strings
    health_check_url      TEXT,
    status                TEXT NOT NULL,          -- UP, DOWN, STARTING, OUT_OF_SERVICE
    renewal_interval_secs REAL NOT NULL,
    duration_secs         REAL NOT NULL,
    registered_at_ms      INTEGER NOT NULL,
    last_heartbeat_ms     INTEGER NOT NULL,
    status_changed_at_ms  INTEGER NOT NULL
);
CREATE INDEX instances_service ON instances (service);

CREATE TABLE events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms       INTEGER NOT NULL,
    kind        TEXT NOT NULL,   -- REGISTERED, DEREGISTERED, STATUS_CHANGED, EVICTED, LEASE_EXPIRED, SELF_PRESERVATION_ON, SELF_PRESERVATION_OFF
    service     TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    detail      TEXT NOT NULL
);

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
