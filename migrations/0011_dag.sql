-- The event model as a DAG (issue 11): events keyed by id, with outliers (no state, no
-- stream position), rejected and soft-failed events; prev and auth edges; backward
-- extremities; state groups and backfilled history numbered apart from the live stream.

-- Events: `event_id` is the key. `stream_ordering` is NULL for events clients never see
-- (outliers, rejected and soft-failed events); negative for backfilled history, so it
-- sorts before the live stream and never wakes /sync. `state_group` (the state after the
-- event) is NULL for outliers and rejected events.
CREATE TABLE events_dag (
    event_id         TEXT PRIMARY KEY,
    stream_ordering  BIGINT UNIQUE,
    room_id          TEXT NOT NULL,
    sender           TEXT NOT NULL,
    event_type       TEXT NOT NULL,
    state_key        TEXT,
    depth            BIGINT NOT NULL,
    origin_server_ts BIGINT NOT NULL,
    state_group      BIGINT,
    json             TEXT NOT NULL,
    redacted_by      TEXT,
    txn_device_id    TEXT,
    txn_id           TEXT,
    replaces_state   TEXT,
    txn_scope        TEXT,
    outlier          BOOLEAN NOT NULL DEFAULT FALSE,  -- stored without state (a join's state, auth chains)
    rejected_reason  TEXT,                            -- NULL: accepted
    soft_failed      BOOLEAN NOT NULL DEFAULT FALSE   -- passed auth, failed against the current state
);
INSERT INTO events_dag (event_id, stream_ordering, room_id, sender, event_type, state_key, depth, origin_server_ts,
        state_group, json, redacted_by, txn_device_id, txn_id, replaces_state, txn_scope)
    SELECT event_id, stream_ordering, room_id, sender, event_type, state_key, depth, origin_server_ts,
        state_group, json, redacted_by, txn_device_id, txn_id, replaces_state, txn_scope FROM events;
DROP TABLE events;
ALTER TABLE events_dag RENAME TO events;
CREATE INDEX events_by_room ON events (room_id, stream_ordering) WHERE stream_ordering IS NOT NULL;
CREATE INDEX events_state_by_room ON events (room_id, stream_ordering)
    WHERE state_key IS NOT NULL AND stream_ordering IS NOT NULL;
CREATE INDEX events_by_state_key ON events (room_id, state_key, event_type, stream_ordering) WHERE state_key IS NOT NULL;
CREATE UNIQUE INDEX events_by_txn ON events (sender, txn_device_id, txn_scope, txn_id) WHERE txn_id IS NOT NULL;
-- /messages pages by topological order: depth, then stream position.
CREATE INDEX events_by_topology ON events (room_id, depth, stream_ordering) WHERE stream_ordering IS NOT NULL;

-- The DAG: each event's prev_events. By prev_event_id: an event's children.
CREATE TABLE event_edges (
    event_id      TEXT NOT NULL,
    prev_event_id TEXT NOT NULL,
    room_id       TEXT NOT NULL,
    PRIMARY KEY (event_id, prev_event_id)
);
CREATE INDEX event_edges_by_prev ON event_edges (prev_event_id);

-- Each event's auth_events. Auth chains are read with a recursive query from a set of
-- events down this table's key (event_id, auth_event_id); the walk is bounded (see
-- `Store::get_auth_chain`). A chain index (Synapse's chain cover) can replace it when
-- chains of rooms with many members make the walk slow.
CREATE TABLE event_auth (
    event_id      TEXT NOT NULL,
    auth_event_id TEXT NOT NULL,
    PRIMARY KEY (event_id, auth_event_id)
);

-- Prev events that are named by stored events but not stored (yet): where backfill and
-- the missing-events fetch start.
CREATE TABLE backward_extremities (
    room_id  TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (room_id, event_id)
);

-- Counters apart from the live stream: state group ids, and positions of backfilled
-- history (0, -1, -2, ...: before the live stream, never waking /sync).
CREATE TABLE dag_counters (
    name  TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO dag_counters (name, value) SELECT 'state_group', COALESCE(MAX(group_id), 0) FROM state_groups;
INSERT INTO dag_counters (name, value) VALUES ('backfill', 0);
