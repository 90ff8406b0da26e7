-- The audit trail a security team can use:
--   * every row names the caller's tenant, the target's id and tenant, the reason class, how
--     the change came in (`via`: grpc, http, sql, dsreg) and the database role (`db_role`,
--     session_user) beside the self-declared actor;
--   * denial floods are one row per caller, action, reason and minute, with a count;
--   * publishes and rollbacks made over plain SQL are audited by a trigger;
--   * the table is append-only: UPDATE, DELETE and TRUNCATE are refused (the one update let
--     through raises the count of an aggregated denial row, nothing else).

ALTER TABLE audit_log
    ADD COLUMN caller_org      text        NULL,
    ADD COLUMN caller_projects text[]      NULL,
    ADD COLUMN target_id       uuid        NULL,
    ADD COLUMN reason_class    text        NULL,
    ADD COLUMN via             text        NOT NULL DEFAULT 'grpc',
    ADD COLUMN db_role         text        NOT NULL DEFAULT session_user,
    ADD COLUMN count           integer     NOT NULL DEFAULT 1 CHECK (count >= 1),
    ADD COLUMN last_at         timestamptz NULL,
    ADD COLUMN window_start    timestamptz NULL;

COMMENT ON COLUMN audit_log.org IS 'The target''s organisation, when the request names one.';
COMMENT ON COLUMN audit_log.project IS 'The target''s project, when the request names one.';
COMMENT ON COLUMN audit_log.caller_org IS 'The caller''s organisation (* for every one); NULL when the caller is unknown.';
COMMENT ON COLUMN audit_log.window_start IS 'Aggregated denials: the minute this row counts (count, last_at).';

-- One aggregated row per caller, action, reason and minute.
CREATE UNIQUE INDEX audit_log_denial_window_idx
    ON audit_log (actor, action, reason, window_start) NULLS NOT DISTINCT
    WHERE window_start IS NOT NULL;
CREATE INDEX audit_log_caller_org_at_idx ON audit_log (caller_org, at);
CREATE INDEX audit_log_org_at_idx ON audit_log (org, at);

CREATE FUNCTION dsreg_audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.window_start IS NOT NULL AND NEW.count >= OLD.count
       AND (to_jsonb(NEW) - 'count' - 'last_at') = (to_jsonb(OLD) - 'count' - 'last_at') THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION dsreg_audit_append_only();

CREATE TRIGGER audit_log_no_truncate
    BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION dsreg_audit_append_only();

-- Publishes, rollbacks and unpublishes that did not come through dsreg (which audits its own
-- with the request's details) are audited here, marked `sql`. The function runs as the
-- schema's owner, so a SQL publisher needs no privilege on audit_log.
CREATE FUNCTION dsreg_audit_sql_publish() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    v_org     text;
    v_project text;
    v_trace   text;
BEGIN
    IF NEW.type NOT IN ('published', 'rolled_back', 'unpublished')
       OR coalesce(current_setting('dsreg.via', true), '') <> '' THEN
        RETURN NULL;
    END IF;
    SELECT org, project INTO v_org, v_project FROM datasources WHERE id = NEW.datasource_id;
    v_trace := coalesce(substr(NEW.traceparent, 4, 32), replace(gen_random_uuid()::text, '-', ''));
    INSERT INTO audit_log (actor, action, resource, org, project, version, outcome, reason,
                           diff, trace_id, target_id, via, db_role, reason_class)
    VALUES (NEW.actor, 'sql.' || NEW.type, 'datasource/' || NEW.datasource_id, v_org, v_project,
            NEW.version, 'ok', NULL, NEW.payload, v_trace, NEW.datasource_id, 'sql',
            session_user, NULL);
    RETURN NULL;
END
$$;

CREATE TRIGGER datasource_events_audit_sql
    AFTER INSERT ON datasource_events
    FOR EACH ROW EXECUTE FUNCTION dsreg_audit_sql_publish();

-- The key page tokens are signed with, shared by every instance on this database (a token
-- from one instance pages on at another). 32 bytes from two random UUIDs' random bits.
CREATE TABLE dsreg_page_key (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    key bytea   NOT NULL CHECK (length(key) = 32)
);
INSERT INTO dsreg_page_key (key)
SELECT decode(replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', ''), 'hex');
