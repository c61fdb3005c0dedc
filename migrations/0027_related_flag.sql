-- Whether something relates to an event (issue 13): set when the first row of
-- `event_relations` naming it as parent is written (in that row's transaction), or when
-- the event is stored after such a row. Serving a page of events reads the bundled
-- aggregations (two queries) only when one of its events has it; it is never unset (a
-- redacted child leaves it set: one wasted read, never a missing aggregation).
ALTER TABLE events ADD COLUMN related BOOLEAN NOT NULL DEFAULT FALSE;
UPDATE events SET related = TRUE WHERE event_id IN (SELECT relates_to FROM event_relations);
