-- OpenID tokens (`/user/{userId}/openid/request_token`), which other services trade for
-- the user's id at `/_matrix/federation/v1/openid/userinfo`. Stored as SHA-256 only,
-- with their expiry; expired ones are deleted as new ones are made.
CREATE TABLE openid_tokens (
    token_hash TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL,
    expires_ts BIGINT NOT NULL
);
CREATE INDEX openid_tokens_by_expiry ON openid_tokens (expires_ts);

-- `timestamp_to_event`: a room's history (events with a stream position) by time.
CREATE INDEX events_by_room_ts ON events (room_id, origin_server_ts, stream_ordering)
    WHERE stream_ordering IS NOT NULL;
