-- Webhook delivery ids seen within their signature's tolerance window, shared by every
-- instance: a signed delivery replayed to another instance (behind a load balancer, after the
-- datasource moved) is refused there too. A row is claimed by a unique insert and kept until
-- its signature's timestamp leaves the window; expired rows are taken back by later claims.
CREATE TABLE webhook_delivery_ids (
    datasource_id uuid        NOT NULL REFERENCES datasources (id) ON DELETE CASCADE,
    delivery_id   text        NOT NULL CHECK (length(delivery_id) BETWEEN 1 AND 128),
    expires_at    timestamptz NOT NULL,
    PRIMARY KEY (datasource_id, delivery_id)
);
CREATE INDEX webhook_delivery_ids_expires_idx ON webhook_delivery_ids (expires_at);

-- Whether the writer set a trace context that was dropped as malformed (dsreg.traceparent or
-- the column): the event is still written, untraced, and the registry counts it when it reads
-- the event (dsreg_outbox_invalid_traceparent_total).
ALTER TABLE datasource_events
    ADD COLUMN traceparent_invalid boolean NOT NULL DEFAULT false;

CREATE OR REPLACE FUNCTION dsreg_events_before() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_given text := coalesce(NEW.traceparent,
                             nullif(current_setting('dsreg.traceparent', true), ''));
BEGIN
    IF NEW.actor = '' THEN
        NEW.actor := dsreg_actor();
    END IF;
    NEW.traceparent := dsreg_valid_traceparent(v_given);
    NEW.traceparent_invalid := v_given IS NOT NULL AND NEW.traceparent IS NULL;
    -- The outbox reader's no-skip rule depends on this being the writer's transaction, and
    -- the watch's on the xid existing before the id is taken.
    NEW.xid := pg_current_xact_id();
    NEW.id := nextval('datasource_events_id_seq');
    RETURN NEW;
END
$$;
