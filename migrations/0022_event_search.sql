-- Server-side search (`POST /search`): one row per searchable event, written in the
-- event's own transaction (`storage/persist.rs`) and deleted when the event is
-- redacted. Searchable: `content.body` of `m.room.message`, `content.name` of
-- `m.room.name`, `content.topic` of `m.room.topic`, for events in the room's history
-- (with a stream position, live or backfilled; not rejected, not soft-failed).
-- Encrypted events have no plaintext and are not here.
--
-- The full-text index over `value` is the one part whose SQL differs between the
-- backends, so `Store::open` adds it (`storage/search.rs`, once, idempotent): an FTS5
-- table kept by triggers on SQLite, a generated `tsvector` column with a GIN index on
-- PostgreSQL; and fills this table from the events stored before (recorded as
-- `event_search` in `server_info`).
CREATE TABLE event_search (
    event_id        TEXT PRIMARY KEY,
    stream_ordering BIGINT NOT NULL UNIQUE,
    room_id         TEXT NOT NULL,
    sender          TEXT NOT NULL,
    search_key      TEXT NOT NULL,              -- content.body, content.name or content.topic
    value           TEXT NOT NULL
);
