-- V10: a lease holds as long as its owner is live. Each instance records until when its
-- leases hold (leases_until), and a renewal extends that one row: the cost of a renewal no
-- longer grows with the number of leases an instance holds. A lease row keeps its owner and
-- fencing epoch; it is held while its owner's leases_until is ahead of now().

ALTER TABLE dsreg_instances ADD COLUMN leases_until timestamptz NOT NULL DEFAULT '-infinity';
COMMENT ON COLUMN dsreg_instances.leases_until IS
    'Until when this instance''s leases hold; extended by each renewal, -infinity once stopped.';

-- Leases that had run out are let go; an instance's leases hold as long as its latest one did.
UPDATE datasource_leases SET owner = NULL WHERE owner IS NOT NULL AND expires_at <= now();
UPDATE dsreg_instances i SET leases_until = l.until
FROM (SELECT owner, max(expires_at) AS until FROM datasource_leases
      WHERE owner IS NOT NULL GROUP BY owner) l
WHERE l.owner = i.id AND i.stopped_at IS NULL;

ALTER TABLE datasource_leases DROP COLUMN expires_at;
COMMENT ON TABLE datasource_leases IS
    'Who runs each datasource''s worker: owner, while the owner''s leases_until is ahead, under a fencing epoch that goes up at every claim.';
