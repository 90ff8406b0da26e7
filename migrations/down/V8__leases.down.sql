CREATE OR REPLACE FUNCTION dsreg_event_wakes(type text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT type IN ('created', 'published', 'rolled_back', 'unpublished', 'enabled', 'disabled',
                    'archived', 'desired_changed', 'secret_changed', 'reload_requested')
$$;

DROP TABLE datasource_leases;
DROP TABLE dsreg_instances;
