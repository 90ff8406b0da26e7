CREATE OR REPLACE FUNCTION dsreg_events_before() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.actor = '' THEN
        NEW.actor := dsreg_actor();
    END IF;
    IF NEW.traceparent IS NULL THEN
        NEW.traceparent := dsreg_valid_traceparent(current_setting('dsreg.traceparent', true));
    ELSE
        NEW.traceparent := dsreg_valid_traceparent(NEW.traceparent);
    END IF;
    -- The outbox reader's no-skip rule depends on this being the writer's transaction, and
    -- the watch's on the xid existing before the id is taken.
    NEW.xid := pg_current_xact_id();
    NEW.id := nextval('datasource_events_id_seq');
    RETURN NEW;
END
$$;
ALTER TABLE datasource_events DROP COLUMN traceparent_invalid;
DROP TABLE webhook_delivery_ids;
