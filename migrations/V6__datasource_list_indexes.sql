-- ListDatasources pages by (name, id), within a tenant's org or across all: keyset pages read
-- straight off these instead of sorting every match.
CREATE INDEX datasources_org_name_id_idx ON datasources (org, name, id);
CREATE INDEX datasources_name_id_idx ON datasources (name, id);
