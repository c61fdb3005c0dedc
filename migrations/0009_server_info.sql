-- Facts about this server that must not change once it has data: `server_name` is
-- recorded at the first start, and a start with another name is refused.
CREATE TABLE server_info (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
