-- Relations between events (issue 12): one row per event whose content has an
-- `m.relates_to` with a `rel_type` and an `event_id` (threads, edits, references,
-- annotations), written in the event's own transaction (`storage/persist.rs`) when the
-- event enters the room's history, and deleted when the event is redacted (redaction
-- removes `m.relates_to`). Events stored before this migration are filled from their
-- JSON at the first start (`Store::fill_relations`: SQL cannot read JSON with one text
-- on both backends).
CREATE TABLE event_relations (
    event_id    TEXT PRIMARY KEY,
    relates_to  TEXT NOT NULL,                 -- the parent event's id
    rel_type    TEXT NOT NULL,                 -- m.thread, m.replace, m.reference, m.annotation, ...
    event_type  TEXT NOT NULL,                 -- the child's type
    sender      TEXT NOT NULL,                 -- the child's sender
    room_id     TEXT NOT NULL
);
CREATE INDEX event_relations_by_parent ON event_relations (relates_to, rel_type, event_type);
-- /threads lists a room's thread roots.
CREATE INDEX event_relations_threads ON event_relations (room_id, rel_type, relates_to);

-- Reports of events and rooms by users (`/report`), listed by `convo admin reports`.
CREATE TABLE reports (
    report_id   BIGINT PRIMARY KEY,            -- from the `report` counter of dag_counters
    room_id     TEXT NOT NULL,
    event_id    TEXT,                          -- NULL: a report of the room
    reporter    TEXT NOT NULL,
    reason      TEXT,
    received_ts BIGINT NOT NULL
);
INSERT INTO dag_counters (name, value) VALUES ('report', 0);
