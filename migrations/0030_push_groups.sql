-- Push actions shared by many members (issue 13). A room's local members whose push
-- rules are equal but for their own ids (one "template", keyed by a hash of its JSON)
-- get the same answer from an event that does not single them out (their id is not in
-- it, their display name not in its body). Such an event now writes one row per
-- template whose answer notifies, instead of one row and one or two count updates per
-- member: a send costs the same in a room of 10 and of 10,000.
--
-- `push_groups`: one row per (main-timeline event, template) that notifies, with the
-- template's cumulative counts in the room up to and including it. A member's count
-- in a room is their row's stored count plus how far their template's cumulative count
-- moved since the row's base (`unread_counts.base_*`). Redacted events keep their rows
-- (the cumulative counts never change); a redaction takes itself out of the members'
-- stored counts instead.
CREATE TABLE push_groups (
    room_id        TEXT NOT NULL,
    template       BIGINT NOT NULL,
    stream_pos     BIGINT NOT NULL,
    event_id       TEXT NOT NULL,
    highlight      INTEGER NOT NULL,
    actions        TEXT NOT NULL,
    cum_notifs     BIGINT NOT NULL,
    cum_highlights BIGINT NOT NULL,
    PRIMARY KEY (room_id, template, stream_pos)
);
-- A redaction finds its event's rows by position.
CREATE INDEX push_groups_by_pos ON push_groups (stream_pos);

-- `push_spans`: which template's rows count for a member in a room, from when (after
-- `from_pos`) and until when (before `to_pos`; NULL while open). Opened with the first
-- event after a join, closed by a membership that ends, and replaced when the member's
-- rules change (seen at the next event: the old span still answers for that event, the
-- new one from the one after). `/notifications` and a receipt's recount read
-- the group rows through them.
CREATE TABLE push_spans (
    user_id  TEXT NOT NULL,
    room_id  TEXT NOT NULL,
    template BIGINT NOT NULL,
    from_pos BIGINT NOT NULL,
    to_pos   BIGINT,
    PRIMARY KEY (user_id, room_id, from_pos)
);
CREATE INDEX push_spans_open ON push_spans (room_id, user_id) WHERE to_pos IS NULL;

-- A member's own row (`event_push_actions`) now also stands for an event that singles
-- them out while their template's row counts it: `notifies` is the member's own answer
-- (0: a row that only takes the group's answer back), `group_notifs` and
-- `group_highlights` what the group's row counted for them. The row's part of the
-- count is its own answer less the group's.
ALTER TABLE event_push_actions ADD COLUMN notifies INTEGER NOT NULL DEFAULT 1;
ALTER TABLE event_push_actions ADD COLUMN group_notifs INTEGER NOT NULL DEFAULT 0;
ALTER TABLE event_push_actions ADD COLUMN group_highlights INTEGER NOT NULL DEFAULT 0;

-- The template the `""` and `"main"` rows follow (NULL: none), and its cumulative
-- counts when the row last took them in.
ALTER TABLE unread_counts ADD COLUMN template BIGINT;
ALTER TABLE unread_counts ADD COLUMN base_notifs BIGINT NOT NULL DEFAULT 0;
ALTER TABLE unread_counts ADD COLUMN base_highlights BIGINT NOT NULL DEFAULT 0;
