-- Send-to-device messages (mostly encrypted key exchange between devices), waiting for
-- their recipient device's next /sync. Deleted once the device has acknowledged them
-- by syncing from a later token.
CREATE TABLE to_device_messages (
    recipient_user   TEXT NOT NULL,
    recipient_device TEXT NOT NULL,
    stream_pos       BIGINT NOT NULL,   -- one position per sendToDevice request
    seq              INTEGER NOT NULL,  -- order within the request
    sender           TEXT NOT NULL,
    event_type       TEXT NOT NULL,
    content          TEXT NOT NULL,
    PRIMARY KEY (recipient_user, recipient_device, stream_pos, seq)
);

-- Transaction ids of sendToDevice requests, so that a retried request is not
-- delivered twice.
CREATE TABLE to_device_txns (
    sender        TEXT NOT NULL,
    sender_device TEXT NOT NULL,
    txn_id        TEXT NOT NULL,
    PRIMARY KEY (sender, sender_device, txn_id)
);
