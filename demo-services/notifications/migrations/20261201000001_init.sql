-- The notifications service's own database: one message per order event (the event id is
-- unique, so a redelivered event adds nothing).
CREATE TABLE messages (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id      TEXT NOT NULL UNIQUE,
    event_type    TEXT NOT NULL,
    order_id      TEXT NOT NULL,
    user_id       TEXT NOT NULL,
    channel       TEXT NOT NULL,
    subject       TEXT NOT NULL,
    body          TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
);
CREATE INDEX messages_user ON messages (user_id, id);
CREATE INDEX messages_order ON messages (order_id, id);
