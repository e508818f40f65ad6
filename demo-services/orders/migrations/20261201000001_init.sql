-- The orders service's own database: orders with their saga's state (written step by step, so
-- any instance can finish an interrupted saga), the saga's history, and the outbox of events
-- (written in the same transaction as the order change they tell of).
CREATE TABLE orders (
    id             TEXT PRIMARY KEY,
    user_id        TEXT NOT NULL,
    -- PENDING -> RESERVED -> CHARGED -> CONFIRMED, or -> COMPENSATING -> FAILED
    status         TEXT NOT NULL,
    items          TEXT NOT NULL,          -- JSON [{productId, name, quantity, unitPriceCents}]
    total_cents    INTEGER NOT NULL,
    currency       TEXT NOT NULL,
    card_number    TEXT NOT NULL,          -- a test card; emptied when the saga ends
    card_last4     TEXT NOT NULL,
    charge_sent    INTEGER NOT NULL DEFAULT 0,  -- a charge may have reached payments: refund on failure
    failure_reason TEXT,
    trace_context  TEXT,                   -- traceparent of the request that placed it
    created_at_ms  INTEGER NOT NULL,
    updated_at_ms  INTEGER NOT NULL,
    lease_owner    TEXT,                   -- the instance running the saga
    lease_until_ms INTEGER NOT NULL        -- after this, any instance may take it over
);
CREATE INDEX orders_user ON orders (user_id, created_at_ms);
CREATE INDEX orders_open ON orders (lease_until_ms) WHERE status NOT IN ('CONFIRMED', 'FAILED');

CREATE TABLE saga_steps (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    order_id TEXT NOT NULL,
    at_ms    INTEGER NOT NULL,
    step     TEXT NOT NULL,   -- place, reserve, charge, confirm, release, refund, fail, recover
    outcome  TEXT NOT NULL,   -- ok, failed
    detail   TEXT NOT NULL
);
CREATE INDEX saga_steps_order ON saga_steps (order_id, id);

CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        TEXT NOT NULL UNIQUE,
    event_type      TEXT NOT NULL,
    payload         TEXT NOT NULL,     -- the OrderEvent as JSON
    trace_context   TEXT,              -- traceparent of the change that wrote it
    created_at_ms   INTEGER NOT NULL,
    published_at_ms INTEGER,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT
);
CREATE INDEX outbox_pending ON outbox (id) WHERE published_at_ms IS NULL;
