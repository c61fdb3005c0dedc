-- Membership changes in a span of the stream, room by room: /sync and /keys/changes
-- look for the members who joined or left a user's rooms since the client's token.
CREATE INDEX memberships_by_room_stream ON memberships (room_id, stream_ordering);
