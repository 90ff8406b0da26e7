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
    NEW.xid := pg_current_xact_id();
    RETURN NEW;
END
$$;

ALTER TABLE datasource_events ALTER COLUMN id SET DEFAULT nextval('datasource_events_id_seq');
