-- The media repository. Each item (`mxc://{server_name}/{media_id}`) names a file
-- stored by the SHA-256 of its bytes (`content_hash`) under `media.path`; items with
-- the same bytes share one file. A local item made by `POST /media/v1/create` has no
-- content yet (`content_hash` NULL) until its creator uploads it, before
-- `unused_expires_ts`. Remote items are a cache of other servers' media (no uploader).
CREATE TABLE media (
    server_name       TEXT NOT NULL,
    media_id          TEXT NOT NULL,
    content_hash      TEXT,
    content_type      TEXT,
    file_name         TEXT,
    size              BIGINT NOT NULL DEFAULT 0,
    uploader          TEXT,
    created_ts        BIGINT NOT NULL,
    unused_expires_ts BIGINT,
    quarantined       BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (server_name, media_id)
);
CREATE INDEX media_by_uploader ON media (uploader, created_ts);
CREATE INDEX media_by_hash ON media (content_hash);

-- Thumbnails made on demand, one per item, size and method (and animated or not),
-- stored by hash like the originals.
CREATE TABLE media_thumbnails (
    server_name  TEXT NOT NULL,
    media_id     TEXT NOT NULL,
    width        BIGINT NOT NULL,
    height       BIGINT NOT NULL,
    method       TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size         BIGINT NOT NULL,
    PRIMARY KEY (server_name, media_id, width, height, method)
);
CREATE INDEX media_thumbnails_by_hash ON media_thumbnails (content_hash);
