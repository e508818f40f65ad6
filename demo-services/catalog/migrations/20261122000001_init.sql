-- The catalog service's own database.
CREATE TABLE products (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    description TEXT NOT NULL,
    category    TEXT NOT NULL,
    price_cents INTEGER NOT NULL CHECK (price_cents >= 0),
    currency    TEXT NOT NULL DEFAULT 'EUR',
    rating      REAL NOT NULL DEFAULT 0,
    image_url   TEXT NOT NULL DEFAULT ''
);
CREATE INDEX products_category ON products (category, name);
