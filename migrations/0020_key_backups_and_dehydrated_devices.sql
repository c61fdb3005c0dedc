-- Server-side key backups (`room_keys`): each user's backup versions, and the room
-- keys clients store in them (encrypted by the client: Convo cannot read them).
-- Versions count up per user from 1 and are never reused: a deleted version keeps
-- its row (`deleted`) so that deleting it again succeeds, and its keys go.
CREATE TABLE room_key_backup_versions (
    user_id   TEXT NOT NULL,
    version   BIGINT NOT NULL,
    algorithm TEXT NOT NULL,
    auth_data TEXT NOT NULL,          -- JSON object
    etag      BIGINT NOT NULL,        -- bumped whenever the version's keys change
    deleted   BOOLEAN NOT NULL,
    PRIMARY KEY (user_id, version)
);

-- One key per (version, room, session); the three columns the spec's replacement
-- rule reads are kept beside the key data as uploaded.
CREATE TABLE room_key_backup_keys (
    user_id             TEXT NOT NULL,
    version             BIGINT NOT NULL,
    room_id             TEXT NOT NULL,
    session_id          TEXT NOT NULL,
    first_message_index BIGINT NOT NULL,
    forwarded_count     BIGINT NOT NULL,
    is_verified         BOOLEAN NOT NULL,
    json                TEXT NOT NULL,  -- the KeyBackupData object
    PRIMARY KEY (user_id, version, room_id, session_id)
);

-- The stream position of the latest claim of a device's one-time or fallback keys:
-- the device's `/sync` answers (with its new key counts) when a claim is newer than
-- its token.
CREATE TABLE e2e_key_claims (
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    stream_pos BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

-- Dehydrated devices (MSC3814): at most one per user, a device whose keys the user's
-- clients keep encrypted on the server (`device_data`) so that it receives to-device
-- messages while no client of the user is online.
CREATE TABLE dehydrated_devices (
    user_id     TEXT PRIMARY KEY,
    device_id   TEXT NOT NULL,
    device_data TEXT NOT NULL         -- JSON object
);
