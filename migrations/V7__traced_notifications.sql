-- Notifications carry the writer's trace context (when it set one), so the registry's
-- reconcile continues the publisher's trace without reading the outbox first.
CREATE OR REPLACE FUNCTION dsreg_events_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
BEGIN
    IF NOT dsreg_event_wakes(NEW.type) THEN
        RETURN NULL;
    END IF;
    v_count := coalesce(nullif(current_setting('dsreg.notify_count', true), '')::integer, 0) + 1;
    PERFORM set_config('dsreg.notify_count', v_count::text, true);
    IF v_count <= 16 THEN
        PERFORM pg_notify('dsreg_events',
            json_strip_nulls(json_build_object('id', NEW.id, 'datasource_id', NEW.datasource_id,
                'type', NEW.type, 'traceparent', NEW.traceparent))::text);
    ELSE
        PERFORM pg_notify('dsreg_events', '{"more":true}');
    END IF;
    RETURN NULL;
END
$$;
