-- V8: scale-out. Every instance registers and heartbeats; each datasource's worker runs under a
-- lease held by one instance, with an expiry and a fencing epoch that goes up at every claim.
-- Whatever a worker writes carries its epoch and is refused unless the lease still matches.

CREATE TABLE dsreg_instances (
    id           text        PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 128),
    address      text        NOT NULL DEFAULT '' CHECK (length(address) <= 256),
    version      text        NOT NULL DEFAULT '' CHECK (length(version) <= 64),
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    stopped_at   timestamptz
);
COMMENT ON TABLE dsreg_instances IS
    'Registry instances: live while heartbeat_at is within the lease time and stopped_at is null.';

CREATE TABLE datasource_leases (
    datasource_id uuid        PRIMARY KEY REFERENCES datasources (id) ON DELETE CASCADE,
    owner         text,
    epoch         bigint      NOT NULL DEFAULT 0 CHECK (epoch >= 0),
    expires_at    timestamptz NOT NULL DEFAULT '-infinity',
    acquired_at   timestamptz
);
COMMENT ON TABLE datasource_leases IS
    'Who runs each datasource''s worker: owner until expires_at, under a fencing epoch that goes up at every claim.';

CREATE INDEX datasource_leases_owner_idx ON datasource_leases (owner) WHERE owner IS NOT NULL;

-- A released lease wakes every instance, so the one it moves to claims it at once.
CREATE OR REPLACE FUNCTION dsreg_event_wakes(type text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT type IN ('created', 'published', 'rolled_back', 'unpublished', 'enabled', 'disabled',
                    'archived', 'desired_changed', 'secret_changed', 'reload_requested',
                    'lease_released')
$$;
