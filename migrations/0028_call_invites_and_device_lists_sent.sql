-- Call invites by room and position (issue 13): a push's `missed_calls` count is the
-- call invites that notified the user after the `after_pos` of the user's kept unread
-- count of each joined room (`unread_counts`, thread ''), read through this index
-- instead of counting the user's push actions over the whole unread history. Partial:
-- no other event pays for it.
CREATE INDEX events_call_invites ON events (room_id, stream_ordering) WHERE event_type = 'm.call.invite';

-- The last device list stream id each remote server was given for each local user
-- (issue 13): in an `m.device_list_update` EDU or a `/user/devices` answer. An EDU's
-- `prev_id` names this id, so that a receiver is never told of an id it never saw
-- (one operation may record several device list changes, and some changes send no
-- EDU), which would make it fetch the whole list again.
CREATE TABLE device_list_sent (
    user_id     TEXT NOT NULL,
    destination TEXT NOT NULL,
    stream_id   BIGINT NOT NULL,
    PRIMARY KEY (user_id, destination)
);
