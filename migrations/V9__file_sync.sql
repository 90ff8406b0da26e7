-- V9: datasources kept in files. One row per datasource last written from a datasource file
-- (`dsreg import`, `dsreg sync --watch`, `dsreg serve --sync-dir`): the file, the hash of the
-- datasource's definition in it, and the published version and revision the datasource had
-- right after. A datasource whose revision has moved since was changed in the database (by the
-- API or SQL) after the file's last sync; a file whose definition hash has moved was edited.
-- Both moving is a conflict, settled by the sync's policy and recorded as a `sync_conflict`
-- event.
CREATE TABLE datasource_file_sync (
    datasource_id   uuid        PRIMARY KEY REFERENCES datasources (id) ON DELETE CASCADE,
    path            text        NOT NULL CHECK (length(path) BETWEEN 1 AND 4096),
    content_hash    text        NOT NULL CHECK (content_hash ~ '^[0-9a-f]{64}$'),
    synced_version  integer     NULL,
    synced_revision bigint      NOT NULL,
    synced_at       timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE datasource_file_sync IS
    'Which file last wrote each file-managed datasource, and the datasource''s version and revision right after.';

-- Pruning finds the datasources synced from files under a folder by path prefix.
CREATE INDEX datasource_file_sync_path_idx ON datasource_file_sync (path text_pattern_ops);
