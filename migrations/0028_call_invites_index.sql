-- Call invites by room and position (issue 13): a push's `missed_calls` count is the
-- call invites that notified the user after the `after_pos` of the user's kept unread
-- count of each joined room (`unread_counts`, thread ''), read through this index
-- instead of counting the user's push actions over the whole unread history. Partial:
-- no other event pays for it.
CREATE INDEX events_call_invites ON events (room_id, stream_ordering) WHERE event_type = 'm.call.invite';
