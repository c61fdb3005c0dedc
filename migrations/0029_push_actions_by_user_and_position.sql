-- Push actions keyed by (user, position) alone (issue 13). The table had two indexes
-- that begin with the user: its primary key (user, room, position) and
-- `event_push_actions_by_user` (user, position). A send writes one row per notified
-- member, and each row's entry lands on a different page of each index: in a room of
-- 10,000 members, some 20,000 scattered index pages per message, written to the WAL and
-- copied back by the checkpoint (about 230 MB of writes per send). A position is one
-- event's, so (user, position) is unique and serves every read: a row by user, room
-- and position (the room checked on the row), a user's notifications newest first, a
-- user's rows in a room after a position. One index, half the pages.
CREATE TABLE event_push_actions_new (
    user_id    TEXT NOT NULL,
    room_id    TEXT NOT NULL,
    stream_pos BIGINT NOT NULL,
    event_id   TEXT NOT NULL,
    highlight  INTEGER NOT NULL,
    actions    TEXT,
    PRIMARY KEY (user_id, stream_pos)
);
INSERT INTO event_push_actions_new (user_id, room_id, stream_pos, event_id, highlight, actions)
SELECT user_id, room_id, stream_pos, event_id, highlight, actions FROM event_push_actions WHERE TRUE
ON CONFLICT DO NOTHING;
DROP TABLE event_push_actions;
ALTER TABLE event_push_actions_new RENAME TO event_push_actions;
