-- Other servers' signing keys (federation), fetched from each server's
-- /_matrix/key/v2/server, checked (self-signature, server name) and cached until
-- valid_until_ts. expired_ts is set for the keys a server lists in old_verify_keys.
CREATE TABLE server_signing_keys (
    server_name    TEXT NOT NULL,
    key_id         TEXT NOT NULL,
    public_key     TEXT NOT NULL,
    valid_until_ts BIGINT NOT NULL,
    expired_ts     BIGINT,
    fetched_ts     BIGINT NOT NULL,
    PRIMARY KEY (server_name, key_id)
);

-- The latest signed key response of each server, as it was received, for answering
-- notary queries (POST /_matrix/key/v2/query) with the origin's own signature.
CREATE TABLE server_key_responses (
    server_name    TEXT PRIMARY KEY,
    response       TEXT NOT NULL,
    valid_until_ts BIGINT NOT NULL,
    fetched_ts     BIGINT NOT NULL
);
