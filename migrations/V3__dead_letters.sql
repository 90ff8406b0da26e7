-- V3: dead letters: records a version's transform refused (a script error, an output that
-- breaks the output schema), kept with the reason so they can be inspected and replayed.

CREATE TABLE datasource_dead_letters (
    id            bigserial   PRIMARY KEY,
    datasource_id uuid        NOT NULL,
    version       integer     NOT NULL,
    epoch         bigint      NOT NULL DEFAULT 0,
    record        jsonb       NOT NULL,
    error_code    text        NOT NULL,
    error         text        NOT NULL,
    at            timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE datasource_dead_letters IS
    'Input records whose transform failed, with the reason; never retried automatically.';

CREATE INDEX datasource_dead_letters_datasource_idx ON datasource_dead_letters (datasource_id, id);
