-- Accounts: users, profiles, devices, tokens, registration tokens, UIA sessions and
-- account data. Timestamps are milliseconds since the Unix epoch.

CREATE TABLE users (
    user_id       TEXT PRIMARY KEY,
    password_hash TEXT,                       -- argon2id PHC string; NULL: no password login
    is_admin      BOOLEAN NOT NULL DEFAULT FALSE,
    deactivated   BOOLEAN NOT NULL DEFAULT FALSE,
    created_ts    BIGINT NOT NULL
);

-- One row per profile field (displayname, avatar_url, extended fields); value is JSON.
CREATE TABLE profile_fields (
    user_id TEXT NOT NULL REFERENCES users (user_id),
    field   TEXT NOT NULL,
    value   TEXT NOT NULL,
    PRIMARY KEY (user_id, field)
);

CREATE TABLE devices (
    user_id      TEXT NOT NULL REFERENCES users (user_id),
    device_id    TEXT NOT NULL,
    display_name TEXT,
    created_ts   BIGINT NOT NULL,
    last_seen_ts BIGINT,
    last_seen_ip TEXT,
    PRIMARY KEY (user_id, device_id)
);

-- Only the SHA-256 of a token is stored.
CREATE TABLE access_tokens (
    token_hash         TEXT PRIMARY KEY,
    user_id            TEXT NOT NULL,
    device_id          TEXT NOT NULL,
    created_ts         BIGINT NOT NULL,
    expires_ts         BIGINT,                -- NULL: never expires
    refresh_token_hash TEXT,                  -- the refresh token issued alongside
    prev_refresh_hash  TEXT,                  -- revoked when this token is first used
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id)
);
CREATE INDEX access_tokens_by_device ON access_tokens (user_id, device_id);
CREATE INDEX access_tokens_by_refresh ON access_tokens (refresh_token_hash);

CREATE TABLE refresh_tokens (
    token_hash      TEXT PRIMARY KEY,
    user_id         TEXT NOT NULL,
    device_id       TEXT NOT NULL,
    created_ts      BIGINT NOT NULL,
    prev_token_hash TEXT,                     -- revoked when this token is first used
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id)
);
CREATE INDEX refresh_tokens_by_device ON refresh_tokens (user_id, device_id);

CREATE TABLE registration_tokens (
    token        TEXT PRIMARY KEY,
    uses_allowed BIGINT,                      -- NULL: unlimited
    completed    BIGINT NOT NULL DEFAULT 0,
    expiry_ts    BIGINT,                      -- NULL: never expires
    created_ts   BIGINT NOT NULL
);

-- User-interactive authentication sessions in progress.
CREATE TABLE uiaa_sessions (
    session_id         TEXT PRIMARY KEY,
    purpose            TEXT NOT NULL,         -- e.g. "register", "delete_devices"
    user_id            TEXT,                  -- whom the session authenticates, once known
    completed          TEXT NOT NULL,         -- JSON array of completed stage types
    registration_token TEXT,                  -- the token a registration session used
    created_ts         BIGINT NOT NULL
);
CREATE INDEX uiaa_sessions_by_token ON uiaa_sessions (registration_token);
CREATE INDEX uiaa_sessions_by_age ON uiaa_sessions (created_ts);

-- Account data; room_id is '' for global account data. content is JSON.
CREATE TABLE account_data (
    user_id   TEXT NOT NULL,
    room_id   TEXT NOT NULL,
    data_type TEXT NOT NULL,
    content   TEXT NOT NULL,
    PRIMARY KEY (user_id, room_id, data_type)
);
