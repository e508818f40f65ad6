-- The inventory service's own database: stock per product, reservations per order, and the
-- order events already applied (so a redelivered event takes effect once).
CREATE TABLE stock (
    product_id TEXT PRIMARY KEY,
    available  INTEGER NOT NULL CHECK (available >= 0),
    reserved   INTEGER NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    -- A restock brings `available` back up to this (0: discontinued, never restocked).
    restock_to INTEGER NOT NULL
);

CREATE TABLE reservations (
    order_id      TEXT PRIMARY KEY,
    state         TEXT NOT NULL,   -- RESERVED, RELEASED, COMMITTED
    items         TEXT NOT NULL,   -- JSON [{"productId", "quantity"}]
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
CREATE INDEX reservations_state ON reservations (state, updated_at_ms);

CREATE TABLE processed_events (
    event_id        TEXT PRIMARY KEY,
    processed_at_ms INTEGER NOT NULL
);

-- Stock for the catalog's products. p-1016 (the standing desk) is sold out and discontinued,
-- so orders for it fail by design.
WITH RECURSIVE n(i) AS (SELECT 1001 UNION ALL SELECT i + 1 FROM n WHERE i < 1040)
INSERT INTO stock (product_id, available, restock_to)
SELECT 'p-' || i, CASE WHEN i = 1016 THEN 0 ELSE 50 END, CASE WHEN i = 1016 THEN 0 ELSE 50 END FROM n;
