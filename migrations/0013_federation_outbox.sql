-- Outbound federation: what each destination server has still to receive, in order.
-- A PDU row names a local event (its JSON is read from `events` when sent) at the
-- event's stream position; an EDU row holds the EDU itself at a position of the
-- sender's own counter. Rows are deleted once the destination has taken them.
CREATE TABLE federation_outbox (
    destination TEXT NOT NULL,
    kind        TEXT NOT NULL,                    -- 'pdu' or 'edu'
    position    BIGINT NOT NULL,                  -- sending order within a kind
    event_id    TEXT,                             -- a PDU: the event
    edu_json    TEXT,                             -- an EDU: {"edu_type": ..., "content": ...}
    expires_ms  BIGINT,                           -- an EDU not worth sending after this (typing)
    PRIMARY KEY (destination, kind, position)
);

-- Inbound federation transactions already processed, with the answer given, so that a
-- transaction sent again (the answer was lost) is answered the same without being
-- applied twice. Old rows are deleted after a day.
CREATE TABLE federation_inbound_txns (
    origin      TEXT NOT NULL,
    txn_id      TEXT NOT NULL,
    response    TEXT NOT NULL,
    received_ts BIGINT NOT NULL,
    PRIMARY KEY (origin, txn_id)
);
CREATE INDEX federation_inbound_txns_by_ts ON federation_inbound_txns (received_ts);

-- Invites from other servers to rooms this server is not in: the room state the
-- inviting server sent along (stripped: type, state_key, sender, content), shown with
-- the invite in /sync, since there is no local state to show.
CREATE TABLE invite_states (
    event_id       TEXT PRIMARY KEY,
    room_id        TEXT NOT NULL,
    user_id        TEXT NOT NULL,
    stripped_state TEXT NOT NULL               -- a JSON array
);
