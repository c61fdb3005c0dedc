-- End-to-end encryption keys that clients publish for each other. Convo stores and
-- hands them out; it cannot use them (it never sees message plaintext).

-- A device's identity keys (its signed `device_keys` object), one per device.
CREATE TABLE e2e_device_keys (
    user_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    json      TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

-- One-time keys: each is handed out once, by /keys/claim.
CREATE TABLE e2e_one_time_keys (
    user_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_id    TEXT NOT NULL,                 -- the full "algorithm:id"
    json      TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, key_id)
);
CREATE INDEX e2e_one_time_keys_by_algorithm ON e2e_one_time_keys (user_id, device_id, algorithm);

-- Fallback keys: the latest per device and algorithm, handed out (and marked used)
-- when no one-time key is left.
CREATE TABLE e2e_fallback_keys (
    user_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_id    TEXT NOT NULL,
    json      TEXT NOT NULL,
    used      BOOLEAN NOT NULL,
    PRIMARY KEY (user_id, device_id, algorithm)
);

-- Users whose device list (a device, or a device's keys) changed, by stream position:
-- the source of /sync's `device_lists.changed` and of /keys/changes.
CREATE TABLE device_list_changes (
    user_id    TEXT NOT NULL,
    stream_pos BIGINT NOT NULL,
    PRIMARY KEY (user_id, stream_pos)
);
CREATE INDEX device_list_changes_by_pos ON device_list_changes (stream_pos);

-- Cross-signing keys: each user's master, self-signing and user-signing key (signed JSON).
CREATE TABLE e2e_cross_signing_keys (
    user_id  TEXT NOT NULL,
    key_type TEXT NOT NULL,                  -- master, self_signing or user_signing
    json     TEXT NOT NULL,
    PRIMARY KEY (user_id, key_type)
);
