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
