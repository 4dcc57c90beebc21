-- Flotilla coordinator schema, SQLite. Times are Unix seconds; ids are lowercase hex.
CREATE TABLE products (
    name         TEXT PRIMARY KEY,
    trust_root   TEXT NOT NULL,              -- trust-root envelope, verbatim
    enroll_hash  TEXT,                       -- SHA-256 of the enrollment secret, hex
    stage_plan   TEXT,                       -- JSON, NULL = server default
    created_at   INTEGER NOT NULL
);

CREATE TABLE tokens (
    hash        TEXT PRIMARY KEY,            -- SHA-256 of the token, hex
    scope       TEXT NOT NULL,               -- device | publish | admin
    product     TEXT,
    device_id   TEXT,
    label       TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER,
    revoked     INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE devices (
    product        TEXT NOT NULL,
    device_id      TEXT NOT NULL,
    channel        TEXT NOT NULL,
    hardware       TEXT,
    version        TEXT,
    version_code   INTEGER,
    agent_version  TEXT,
    native_version TEXT,
    enrolled_at    INTEGER NOT NULL,
    last_seen      INTEGER NOT NULL,
    PRIMARY KEY (product, device_id)
);

CREATE TABLE objects (
    kind  TEXT NOT NULL,                     -- chunk | index
    id    TEXT NOT NULL,
    size  INTEGER NOT NULL,
    PRIMARY KEY (kind, id)
);

CREATE TABLE releases (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    product         TEXT NOT NULL,
    channel         TEXT NOT NULL,
    version         TEXT NOT NULL,
    version_code    INTEGER NOT NULL,
    manifest        TEXT NOT NULL,           -- manifest envelope, verbatim
    manifest_sha256 TEXT NOT NULL,
    image_size      INTEGER NOT NULL,
    image_sha256    TEXT NOT NULL,
    index_id        TEXT NOT NULL,
    index_size      INTEGER NOT NULL,
    mandatory       INTEGER NOT NULL,
    salt            TEXT NOT NULL,
    archived        INTEGER NOT NULL DEFAULT 0,
    created_at      INTEGER NOT NULL,
    -- rollout state
    state           TEXT NOT NULL,           -- active | paused | halted | completed | superseded
    stage           INTEGER NOT NULL,
    basis_points    INTEGER NOT NULL,
    stage_plan      TEXT NOT NULL,           -- JSON
    stage_started   INTEGER NOT NULL,
    state_reason    TEXT,
    UNIQUE (product, channel, version_code),
    UNIQUE (product, channel, version)
);
CREATE INDEX releases_live ON releases (product, channel, archived, version_code);

CREATE TABLE events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    release_id   INTEGER,
    product      TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    kind         TEXT NOT NULL,
    bytes_peer   INTEGER NOT NULL DEFAULT 0,
    bytes_cdn    INTEGER NOT NULL DEFAULT 0,
    bytes_local  INTEGER NOT NULL DEFAULT 0,
    bytes_delta  INTEGER NOT NULL DEFAULT 0,
    detail       TEXT,
    created_at   INTEGER NOT NULL
);
CREATE INDEX events_release ON events (release_id, kind, created_at);

CREATE TABLE audit (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target      TEXT NOT NULL,
    before      TEXT,
    after       TEXT,
    created_at  INTEGER NOT NULL
);

CREATE TABLE leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    expires_at  INTEGER NOT NULL
);
