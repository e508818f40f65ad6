-- The users service's own database.
CREATE TABLE users (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    email         TEXT NOT NULL UNIQUE COLLATE NOCASE,
    name          TEXT NOT NULL,
    password_hash TEXT NOT NULL,          -- argon2id PHC string
    created_at_ms INTEGER NOT NULL
);

-- The key tokens are signed with. One row: every instance of the service signs with it, and the
-- gateway verifies with its public half, published as JWKS.
CREATE TABLE signing_key (
    slot          INTEGER PRIMARY KEY CHECK (slot = 1),
    kid           TEXT NOT NULL,
    private_pkcs8 BLOB NOT NULL,
    public_key    BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL
);
