-- Push rule outcomes: one row per local user and event that notifies that user (the
-- rule's actions include "notify"). The source of the unread notification and
-- highlight counts in /sync, and later of /notifications and pushers.
CREATE TABLE event_push_actions (
    user_id    TEXT NOT NULL,
    room_id    TEXT NOT NULL,
    stream_pos BIGINT NOT NULL,
    event_id   TEXT NOT NULL,
    highlight  INTEGER NOT NULL,                 -- 1 when a "highlight" tweak is set
    PRIMARY KEY (user_id, room_id, stream_pos)
);
