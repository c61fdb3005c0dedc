-- Redactions received before the event they redact (room versions 3 and up let a
-- redaction through the auth rules without its target). When the target arrives, the
-- redaction is applied if it may be (same server as the target's sender, or the
-- redaction's sender had the redact power level in the state before it), and its row
-- deleted.
CREATE TABLE pending_redactions (
    target_id    TEXT NOT NULL,
    redaction_id TEXT NOT NULL,
    room_id      TEXT NOT NULL,
    PRIMARY KEY (target_id, redaction_id)
);
