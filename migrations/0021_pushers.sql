-- Notifications: the push rule actions of each notification (for /notifications and
-- the tweaks sent to push gateways), pushers, and the queue of pushes still to send.

-- The actions of the rule that matched, as a JSON array. NULL on rows stored before
-- this migration: read as ["notify"], plus the highlight tweak when `highlight` is set.
ALTER TABLE event_push_actions ADD COLUMN actions TEXT;
-- /notifications: a user's notifications, newest first, in all rooms.
CREATE INDEX event_push_actions_by_user ON event_push_actions (user_id, stream_pos);

-- HTTP pushers (POST /pushers/set). (app_id, pushkey) is unique per user; the same
-- pair may belong to several users only when set with `append: true`.
CREATE TABLE pushers (
    user_id             TEXT NOT NULL,
    app_id              TEXT NOT NULL,
    pushkey             TEXT NOT NULL,
    kind                TEXT NOT NULL,             -- 'http'
    app_display_name    TEXT NOT NULL,
    device_display_name TEXT NOT NULL,
    profile_tag         TEXT,
    lang                TEXT NOT NULL,
    data                TEXT NOT NULL,             -- the JSON object given, `url` included
    device_id           TEXT NOT NULL,             -- the device whose access token set it
    pushkey_ts          BIGINT NOT NULL,           -- when it was set (ms)
    PRIMARY KEY (user_id, app_id, pushkey)
);
CREATE INDEX pushers_by_pushkey ON pushers (app_id, pushkey);

-- Pushes still to send, per pusher, in position order. An 'event' row is written in
-- the notifying event's own transaction (the event's stream position); a 'badge' row
-- (updated unread count, no event) after a read receipt, at the receipt's position.
-- A row goes once the gateway took it, or after too many failed attempts.
CREATE TABLE push_queue (
    user_id  TEXT NOT NULL,
    app_id   TEXT NOT NULL,
    pushkey  TEXT NOT NULL,
    position BIGINT NOT NULL,
    kind     TEXT NOT NULL,                        -- 'event' or 'badge'
    room_id  TEXT,
    event_id TEXT,
    attempts INTEGER NOT NULL,
    PRIMARY KEY (user_id, app_id, pushkey, position)
);
