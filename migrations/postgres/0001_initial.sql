-- Flotilla coordinator schema, PostgreSQL. Times are Unix seconds; ids are lowercase hex.
CREATE TABLE products (
    name         TEXT PRIMARY KEY,
    trust_root   TEXT NOT NULL,              -- trust-root envelope, verbatim
    enroll_hash  TEXT,                       -- SHA-256 of the enrollment secret, hex
    stage_plan   TEXT,                       -- JSON, NULL = server default
    created_at   BIGINT NOT NULL
);

CREATE TABLE tokens (
    hash        TEXT PRIMARY KEY,            -- SHA-256 of the token, hex
    scope       TEXT NOT NULL,               -- device | publish | admin
    product     TEXT,
    device_id   TEXT,
    label       TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT,
    revoked     BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE devices (
    product        TEXT NOT NULL,
    device_id      TEXT NOT NULL,
    channel        TEXT NOT NULL,
    hardware       TEXT,
    version        TEXT,
    version_code   BIGINT,
    agent_version  TEXT,
    native_version TEXT,
    enrolled_at    BIGINT NOT NULL,
    last_seen      BIGINT NOT NULL,
    PRIMARY KEY (product, device_id)
);

CREATE TABLE objects (
    kind  TEXT NOT NULL,                     -- chunk | index
    id    TEXT NOT NULL,
    size  BIGINT NOT NULL,
    PRIMARY KEY (kind, id)
);

CREATE TABLE releases (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    product         TEXT NOT NULL,
    channel         TEXT NOT NULL,
    version         TEXT NOT NULL,
    version_code    BIGINT NOT NULL,
    manifest        TEXT NOT NULL,           -- manifest envelope, verbatim
    manifest_sha256 TEXT NOT NULL,
    image_size      BIGINT NOT NULL,
    image_sha256    TEXT NOT NULL,
    index_id        TEXT NOT NULL,
    index_size      BIGINT NOT NULL,
    mandatory       BIGINT NOT NULL,
    salt            TEXT NOT NULL,
    archived        BIGINT NOT NULL DEFAULT 0,
    created_at      BIGINT NOT NULL,
    -- rollout state
    state           TEXT NOT NULL,           -- active | paused | halted | completed | superseded
    stage           BIGINT NOT NULL,
    basis_points    BIGINT NOT NULL,
    stage_plan      TEXT NOT NULL,           -- JSON
    stage_started   BIGINT NOT NULL,
    state_reason    TEXT,
    UNIQUE (product, channel, version_code),
    UNIQUE (product, channel, version)
);
CREATE INDEX releases_live ON releases (product, channel, archived, version_code);

CREATE TABLE events (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    release_id   BIGINT,
    product      TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    kind         TEXT NOT NULL,
    bytes_peer   BIGINT NOT NULL DEFAULT 0,
    bytes_cdn    BIGINT NOT NULL DEFAULT 0,
    bytes_local  BIGINT NOT NULL DEFAULT 0,
    bytes_delta  BIGINT NOT NULL DEFAULT 0,
    detail       TEXT,
    created_at   BIGINT NOT NULL
);
CREATE INDEX events_release ON events (release_id, kind, created_at);

CREATE TABLE audit (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target      TEXT NOT NULL,
    before      TEXT,
    after       TEXT,
    created_at  BIGINT NOT NULL
);

CREATE TABLE leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    expires_at  BIGINT NOT NULL
);
