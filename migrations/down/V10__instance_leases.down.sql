ALTER TABLE datasource_leases ADD COLUMN expires_at timestamptz NOT NULL DEFAULT '-infinity';
UPDATE datasource_leases l SET expires_at = i.leases_until
FROM dsreg_instances i WHERE i.id = l.owner;
COMMENT ON TABLE datasource_leases IS
    'Who runs each datasource''s worker: owner until expires_at, under a fencing epoch that goes up at every claim.';
ALTER TABLE dsreg_instances DROP COLUMN leases_until;
