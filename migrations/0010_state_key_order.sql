-- A user's member events (and any one state key's history) in stream order, read on
-- every /messages and by sync: with the stream position in the index, SQLite reads
-- just those events instead of every state event of the room.
DROP INDEX events_by_state_key;
CREATE INDEX events_by_state_key ON events (room_id, state_key, event_type, stream_ordering) WHERE state_key IS NOT NULL;
