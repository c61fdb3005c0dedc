-- Rooms, events (full PDUs), state groups, current state, memberships and the stream.

-- One counter orders everything sync reports (events, account data, receipts, ...).
-- Taking a position locks the row, so positions commit in order.
CREATE TABLE stream_position (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    pos BIGINT NOT NULL
);
INSERT INTO stream_position (id, pos) VALUES (1, 0);

CREATE TABLE rooms (
    room_id      TEXT PRIMARY KEY,
    room_version TEXT NOT NULL,
    creator      TEXT NOT NULL,
    created_ts   BIGINT NOT NULL,
    published    BOOLEAN NOT NULL DEFAULT FALSE   -- listed in the public room directory
);

-- Every event, as the PDU (canonical JSON, redacted in place once redacted).
CREATE TABLE events (
    stream_ordering  BIGINT PRIMARY KEY,          -- position in the stream
    event_id         TEXT NOT NULL UNIQUE,
    room_id          TEXT NOT NULL,
    sender           TEXT NOT NULL,
    event_type       TEXT NOT NULL,
    state_key        TEXT,                        -- NULL: not a state event
    depth            BIGINT NOT NULL,
    origin_server_ts BIGINT NOT NULL,
    state_group      BIGINT NOT NULL,             -- the room state after this event
    json             TEXT NOT NULL,
    redacted_by      TEXT,                        -- the redaction event, once applied
    txn_device_id    TEXT,                        -- the sending device and its
    txn_id           TEXT                         --   transaction id, for local sends
);
CREATE INDEX events_by_room ON events (room_id, stream_ordering);
CREATE INDEX events_state_by_room ON events (room_id, stream_ordering) WHERE state_key IS NOT NULL;
CREATE INDEX events_by_state_key ON events (room_id, state_key, event_type) WHERE state_key IS NOT NULL;
CREATE UNIQUE INDEX events_by_txn ON events (sender, txn_device_id, txn_id) WHERE txn_id IS NOT NULL;

-- Room state as groups: a group is its parent plus a delta, or a full snapshot. Chains stay short (a snapshot every so often), so "state at event X"
-- is a few indexed reads, and a room of many members does not copy its state per event.
CREATE TABLE state_groups (
    group_id     BIGINT PRIMARY KEY,
    room_id      TEXT NOT NULL,
    prev_group   BIGINT,                          -- the state before (NULL for the first)
    is_snapshot  BOOLEAN NOT NULL,                -- entries are the full state, not a delta
    chain_length BIGINT NOT NULL                  -- deltas since the last snapshot
);
CREATE TABLE state_group_entries (
    group_id   BIGINT NOT NULL,
    event_type TEXT NOT NULL,
    state_key  TEXT NOT NULL,
    event_id   TEXT NOT NULL,
    PRIMARY KEY (group_id, event_type, state_key)
);

-- The room's state now.
CREATE TABLE current_state (
    room_id    TEXT NOT NULL,
    event_type TEXT NOT NULL,
    state_key  TEXT NOT NULL,
    event_id   TEXT NOT NULL,
    PRIMARY KEY (room_id, event_type, state_key)
);

-- Current membership of every user known in every room.
CREATE TABLE memberships (
    room_id         TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    membership      TEXT NOT NULL,               -- join, invite, leave, ban, knock
    event_id        TEXT NOT NULL,
    stream_ordering BIGINT NOT NULL,
    forgotten       BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX memberships_by_user ON memberships (user_id, membership);
CREATE INDEX memberships_by_room ON memberships (room_id, membership);
CREATE INDEX memberships_by_user_stream ON memberships (user_id, stream_ordering);

-- The events with no successors yet: the next event's prev_events.
CREATE TABLE forward_extremities (
    room_id  TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (room_id, event_id)
);

-- Account data changes get stream positions too, for incremental sync.
ALTER TABLE account_data ADD COLUMN stream_pos BIGINT NOT NULL DEFAULT 0;
CREATE INDEX account_data_by_stream ON account_data (user_id, stream_pos);

CREATE TABLE filters (
    user_id   TEXT NOT NULL,
    filter_id BIGINT NOT NULL,
    json      TEXT NOT NULL,
    PRIMARY KEY (user_id, filter_id)
);

-- Room aliases (#name:server) of local rooms.
CREATE TABLE room_aliases (
    alias   TEXT PRIMARY KEY,
    room_id TEXT NOT NULL,
    creator TEXT NOT NULL
);
CREATE INDEX room_aliases_by_room ON room_aliases (room_id);

-- Read receipts: the latest per (room, user, type, thread).
CREATE TABLE receipts (
    room_id      TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    receipt_type TEXT NOT NULL,                   -- m.read or m.read.private
    thread_id    TEXT NOT NULL,                   -- '' when unthreaded
    event_id     TEXT NOT NULL,
    ts           BIGINT NOT NULL,
    stream_pos   BIGINT NOT NULL,
    PRIMARY KEY (room_id, user_id, receipt_type, thread_id)
);
CREATE INDEX receipts_by_stream ON receipts (room_id, stream_pos);

-- Presence, the latest per user.
CREATE TABLE presence (
    user_id        TEXT PRIMARY KEY,
    state          TEXT NOT NULL,                 -- online, unavailable, offline
    status_msg     TEXT,
    last_active_ts BIGINT NOT NULL,
    stream_pos     BIGINT NOT NULL
);
CREATE INDEX presence_by_stream ON presence (stream_pos);
