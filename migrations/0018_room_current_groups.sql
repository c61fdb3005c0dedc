-- The room's current state after an event, where it is not the event's own state: the
-- current state was resolved over several forward extremities, or the event did not
-- change it (an event on an older branch). `/sync` reads the room's state at a stream
-- position from the last event of the room up to it: this group, else its own.
CREATE TABLE room_current_groups (
    room_id         TEXT NOT NULL,
    stream_ordering BIGINT NOT NULL,
    group_id        BIGINT NOT NULL,
    PRIMARY KEY (room_id, stream_ordering)
);
