-- unsigned.replaces_state, prev_content and prev_sender: the state event that each state
-- event replaced, recorded when it is stored (NULL for the first of its type and key).
ALTER TABLE events ADD COLUMN replaces_state TEXT;
UPDATE events SET replaces_state = (
    SELECT p.event_id FROM events p
    WHERE p.room_id = events.room_id AND p.state_key = events.state_key AND p.event_type = events.event_type
      AND p.stream_ordering < events.stream_ordering
    ORDER BY p.stream_ordering DESC LIMIT 1
) WHERE state_key IS NOT NULL;

-- Transaction ids are scoped to the device and the endpoint's path (`send/{room}/{type}`,
-- `redact/{room}/{event}`), not to the device alone. Earlier sends get the `send` scope.
ALTER TABLE events ADD COLUMN txn_scope TEXT;
UPDATE events SET txn_scope = 'send/' || room_id || '/' || event_type WHERE txn_id IS NOT NULL;
DROP INDEX events_by_txn;
CREATE UNIQUE INDEX events_by_txn ON events (sender, txn_device_id, txn_scope, txn_id) WHERE txn_id IS NOT NULL;
