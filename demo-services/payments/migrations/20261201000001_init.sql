-- The payments service's own database: one charge per order at most (a voided order keeps a
-- VOIDED row so no later charge goes through), its refund, and the first answer to every
-- idempotency key.
CREATE TABLE charges (
    id            TEXT PRIMARY KEY,
    order_id      TEXT NOT NULL,
    amount_cents  INTEGER NOT NULL,
    currency      TEXT NOT NULL,
    card_last4    TEXT NOT NULL,
    status        TEXT NOT NULL,   -- CAPTURED, DECLINED, REFUNDED, VOIDED
    reason        TEXT,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
CREATE INDEX charges_order ON charges (order_id, created_at_ms);

CREATE TABLE idempotency (
    operation     TEXT NOT NULL,   -- charge or refund
    key           TEXT NOT NULL,
    request_hash  TEXT NOT NULL,   -- SHA-256 of the request's JSON
    status_code   INTEGER NOT NULL,
    body          TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (operation, key)
);
CREATE INDEX idempotency_age ON idempotency (created_at_ms);
