-- Unread notification and highlight counts kept at write time, so that /sync reads
-- them instead of counting `event_push_actions` after the read receipt on every sync.
-- One row per (user, room, scope): thread_id '' is the whole room (counted after the
-- latest of the join and every read receipt of the user there), 'main' the main
-- timeline and a thread root's event id that thread (each counted after the latest of
-- the join, the unthreaded receipt and the receipt of that thread). `after_pos` is the
-- stream position the row counts after. Incremented with the event's push actions,
-- decremented when a counted event is redacted, recomputed when a receipt moves, and
-- dropped when the user's membership stops being a join. Filled at start for data
-- stored before this migration (`Store::fill_unread_counts`).
CREATE TABLE unread_counts (
    user_id    TEXT NOT NULL,
    room_id    TEXT NOT NULL,
    thread_id  TEXT NOT NULL,
    after_pos  BIGINT NOT NULL,
    notifs     BIGINT NOT NULL,
    highlights BIGINT NOT NULL,
    PRIMARY KEY (user_id, room_id, thread_id)
);
-- A redaction takes its event out of the counts of the room's users.
CREATE INDEX unread_counts_by_room ON unread_counts (room_id, thread_id);
