DROP INDEX datasources_name_id_idx;
DROP INDEX datasources_org_name_id_idx;
