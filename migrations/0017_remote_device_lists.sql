-- Other servers' users' device lists, kept while a local user shares a room with them
-- (their server then tells us of every change, `m.device_list_update`): the devices'
-- keys and the cross-signing keys as the user's server gave them, the last `stream_id`
-- applied, and whether the copy must be fetched again (`user/devices`) before use: an
-- update whose `prev_id` we have not seen, or a membership change that may have made
-- us miss some, makes it stale.
CREATE TABLE remote_device_lists (
    user_id          TEXT PRIMARY KEY,
    stream_id        BIGINT NOT NULL,
    devices          TEXT NOT NULL,   -- JSON: {device_id: device keys}
    master_key       TEXT,
    self_signing_key TEXT,
    stale            BOOLEAN NOT NULL
);
