-- V2: the postgres sink's table: records ingested by the workers, batched by the sink writer.
-- epoch is the writing worker's fencing epoch, so a record written by a stale owner is visible.

CREATE TABLE datasource_records (
    id            bigserial   PRIMARY KEY,
    datasource_id uuid        NOT NULL,
    version       integer     NOT NULL,
    epoch         bigint      NOT NULL DEFAULT 0,
    record        jsonb       NOT NULL,
    ingested_at   timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE datasource_records IS
    'The embedded default sink: transformed records per datasource, in arrival order.';

CREATE INDEX datasource_records_datasource_idx ON datasource_records (datasource_id, id);
