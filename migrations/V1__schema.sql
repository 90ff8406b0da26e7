-- V1: the dsreg schema (PostgreSQL 15, built-in features only).
--
-- refinery runs this file inside one transaction: no BEGIN/COMMIT here.
-- Reverse script: migrations/down/V1__schema.down.sql.
--
-- The data path (see DESIGN.md "The one path data takes"):
--   publish (UPDATE datasource_versions SET state = 'published', or dsreg_publish/dsreg_rollback)
--     -> dsreg_versions_before: lock the datasource row, archive the previously published version
--     -> dsreg_versions_after:  datasources.current_version, one 'published'/'rolled_back' event
--     -> dsreg_events_notify:   pg_notify('dsreg_events', {id, datasource_id, type}), bounded
--
-- Error contract (the Rust side maps SQLSTATEs, never messages):
--   DSR01 unknown datasource           DSR04 no earlier version to roll back to
--   DSR02 unknown version              DSR05 illegal version state transition / config change
--   DSR03 datasource is archived       DSR06 rollback target was never published
--
-- Session settings read by triggers (current_setting(name, true); NULL and '' mean unset):
--   dsreg.actor        who is writing (default: current_user)
--   dsreg.traceparent  W3C traceparent stored on events (ignored unless well-formed)
--   dsreg.notify_count transaction-local, internal: notifications sent so far
--   dsreg.superseding  transaction-local, internal: datasource whose old version is being
--                      archived because a new one is being published (not an unpublish)

-- ---------------------------------------------------------------------------------------------
-- Tables
-- ---------------------------------------------------------------------------------------------

CREATE TABLE datasources (
    id              uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    org             text        NOT NULL CHECK (length(org) BETWEEN 1 AND 128),
    project         text        NOT NULL CHECK (length(project) BETWEEN 1 AND 128),
    name            text        NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    kind            text        NOT NULL CHECK (length(kind) BETWEEN 1 AND 64),
    status          text        NOT NULL DEFAULT 'active'
                                CHECK (status IN ('active', 'disabled', 'archived')),
    owner           text        NOT NULL DEFAULT '',
    tags            text[]      NOT NULL DEFAULT '{}',
    description     text        NOT NULL DEFAULT '',
    -- Maintained only by the datasource_versions triggers; direct writes are ignored.
    current_version integer     NULL,
    -- The etag: bumped by dsreg_datasources_before_update on every UPDATE.
    revision        bigint      NOT NULL DEFAULT 1,
    created_by      text        NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_by      text        NOT NULL DEFAULT '',
    updated_at      timestamptz NOT NULL DEFAULT now(),
    archived_at     timestamptz NULL
);
COMMENT ON TABLE datasources IS
    'Datasource identity, tenancy and status. revision is the etag; current_version is trigger-maintained.';

-- Names are unique among live datasources only: an archived one frees its name for reuse.
CREATE UNIQUE INDEX datasources_name_live_key ON datasources (org, project, name)
    WHERE status <> 'archived';
CREATE INDEX datasources_status_idx ON datasources (status);
CREATE INDEX datasources_owner_idx ON datasources (owner);
CREATE INDEX datasources_kind_idx ON datasources (kind);
-- Non-partial: listing and lookups that include archived datasources.
CREATE INDEX datasources_org_project_name_idx ON datasources (org, project, name);
CREATE INDEX datasources_tags_idx ON datasources USING gin (tags);

CREATE TABLE datasource_versions (
    datasource_id   uuid        NOT NULL REFERENCES datasources (id) ON DELETE CASCADE,
    version         integer     NOT NULL CHECK (version > 0),
    -- A JSON object, at most 1 MiB in its text form.
    config          jsonb       NOT NULL
                                CHECK (jsonb_typeof(config) = 'object'
                                       AND octet_length(config::text) <= 1048576),
    state           text        NOT NULL DEFAULT 'draft'
                                CHECK (state IN ('draft', 'published', 'archived')),
    comment         text        NOT NULL DEFAULT '',
    approval_status text        NOT NULL DEFAULT 'not_required'
                                CHECK (approval_status IN ('not_required', 'pending', 'approved', 'rejected')),
    created_by      text        NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- Set by dsreg_versions_before each time the version becomes published; a non-NULL value
    -- is what makes a version a legal rollback target (DSR06).
    published_at    timestamptz NULL,
    published_by    text        NULL,
    PRIMARY KEY (datasource_id, version)
);
COMMENT ON TABLE datasource_versions IS
    'Immutable-once-published configs of a datasource; at most one published per datasource.';

-- At most one published version per datasource (the trigger archives the old one first).
CREATE UNIQUE INDEX datasource_versions_one_published ON datasource_versions (datasource_id)
    WHERE state = 'published';

CREATE TABLE datasource_state (
    datasource_id      uuid        PRIMARY KEY REFERENCES datasources (id) ON DELETE CASCADE,
    desired            text        NOT NULL DEFAULT 'running' CHECK (desired IN ('running', 'stopped')),
    restart_generation bigint      NOT NULL DEFAULT 0,
    worker_status      text        NOT NULL DEFAULT 'init'
                                   CHECK (worker_status IN ('init', 'starting', 'running', 'error',
                                                            'stopped', 'crash_loop', 'stalled')),
    running_version    integer     NULL,
    owner_instance     text        NULL,
    lease_epoch        bigint      NOT NULL DEFAULT 0,
    lease_expires_at   timestamptz NULL,
    last_heartbeat_at  timestamptz NULL,
    last_progress_at   timestamptz NULL,
    last_event_at      timestamptz NULL,
    error_code         text        NULL,
    error_message      text        NULL,
    restart_count      integer     NOT NULL DEFAULT 0,
    metrics            jsonb       NOT NULL DEFAULT '{}',
    source_cursor      jsonb       NULL,
    updated_at         timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE datasource_state IS
    'Runtime state, one row per datasource (created by trigger with the datasource).';

CREATE INDEX datasource_state_worker_status_idx ON datasource_state (worker_status);
CREATE INDEX datasource_state_owner_instance_idx ON datasource_state (owner_instance);

CREATE TABLE datasource_secrets (
    datasource_id uuid        NOT NULL REFERENCES datasources (id) ON DELETE CASCADE,
    name          text        NOT NULL CHECK (name ~ '^[A-Za-z0-9_.-]{1,128}$'),
    key_version   integer     NOT NULL CHECK (key_version > 0),
    -- AES-GCM: 96-bit nonce; ciphertext = plaintext (<= 64 KiB) + 16-byte tag. Never plaintext.
    nonce         bytea       NOT NULL CHECK (octet_length(nonce) = 12),
    ciphertext    bytea       NOT NULL CHECK (octet_length(ciphertext) <= 65536 + 16),
    revision      bigint      NOT NULL DEFAULT 1,
    fingerprint   text        NOT NULL DEFAULT '',
    created_by    text        NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    rotated_by    text        NULL,
    rotated_at    timestamptz NULL,
    PRIMARY KEY (datasource_id, name)
);
COMMENT ON TABLE datasource_secrets IS 'Sealed secrets of a datasource; never plaintext.';

-- Finds the secrets still sealed under an old key during key rotation.
CREATE INDEX datasource_secrets_key_version_idx ON datasource_secrets (key_version);

-- No foreign key on datasource_id: the history outlives the datasource rows.
CREATE TABLE datasource_events (
    id            bigserial   PRIMARY KEY,
    datasource_id uuid        NULL,
    type          text        NOT NULL CHECK (type ~ '^[a-z][a-z_]{0,63}$'),
    version       integer     NULL,
    actor         text        NOT NULL DEFAULT '',
    payload       jsonb       NOT NULL DEFAULT '{}' CHECK (octet_length(payload::text) <= 65536),
    traceparent   text        NULL,
    -- The writing transaction: ids are taken in one order and committed in another, so the
    -- outbox reader's cursor is a transaction horizon (pg_snapshot_xmin of its last read),
    -- never an id. Always overwritten with pg_current_xact_id() by dsreg_events_before.
    xid           xid8        NOT NULL DEFAULT pg_current_xact_id(),
    -- clock_timestamp(): distinct, ordered times for events of one long transaction.
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);
COMMENT ON TABLE datasource_events IS
    'Outbox and history. Readers must not advance past rows of still-running transactions (see xid).';

CREATE INDEX datasource_events_datasource_id_idx ON datasource_events (datasource_id, id);
CREATE INDEX datasource_events_created_at_idx ON datasource_events (created_at);
CREATE INDEX datasource_events_xid_idx ON datasource_events (xid);
CREATE INDEX datasource_events_type_idx ON datasource_events (type, id);

CREATE TABLE audit_log (
    id       bigserial   PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT now(),
    actor    text        NOT NULL,
    action   text        NOT NULL,
    resource text        NOT NULL,
    org      text        NULL,
    project  text        NULL,
    version  integer     NULL,
    outcome  text        NOT NULL CHECK (outcome IN ('ok', 'denied', 'error')),
    reason   text        NULL,
    -- A diff summary; secret values never.
    diff     jsonb       NULL,
    trace_id text        NULL
);
COMMENT ON TABLE audit_log IS 'Who did what, including denials. Secret values never.';

CREATE INDEX audit_log_at_idx ON audit_log (at);
CREATE INDEX audit_log_resource_at_idx ON audit_log (resource, at);
CREATE INDEX audit_log_actor_at_idx ON audit_log (actor, at);

-- ---------------------------------------------------------------------------------------------
-- Helpers
-- ---------------------------------------------------------------------------------------------

-- Who is writing: the session setting dsreg.actor, else the database role.
CREATE FUNCTION dsreg_actor() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('dsreg.actor', true), ''), current_user::text)
$$;

-- The traceparent if it is a well-formed W3C one, else NULL. Hostile or garbled input is
-- dropped, never raised: tracing must not break a publish. Besides the format, the all-zero
-- trace id and parent id and version ff are invalid per W3C Trace Context.
CREATE FUNCTION dsreg_valid_traceparent(p text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
         AND substr(p, 1, 2) <> 'ff'
         AND substr(p, 4, 32) <> repeat('0', 32)
         AND substr(p, 37, 16) <> repeat('0', 16)
        THEN p
    END
$$;

-- Event types that call for a reconcile and therefore a notification. worker_* and purely
-- informational events wake nobody (the supervisor writes those itself).
CREATE FUNCTION dsreg_event_wakes(type text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT type IN ('created', 'published', 'rolled_back', 'unpublished', 'enabled', 'disabled',
                    'archived', 'desired_changed', 'secret_changed', 'reload_requested')
$$;

-- ---------------------------------------------------------------------------------------------
-- datasource_versions triggers
-- ---------------------------------------------------------------------------------------------

CREATE FUNCTION dsreg_versions_before() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_status text;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF OLD.state <> 'draft' AND NEW.config IS DISTINCT FROM OLD.config THEN
            RAISE EXCEPTION 'datasource % version % is %; its config cannot change (only drafts are editable)',
                    NEW.datasource_id, NEW.version, OLD.state
                USING ERRCODE = 'DSR05';
        END IF;
        IF OLD.state <> 'draft' AND NEW.state = 'draft' THEN
            RAISE EXCEPTION 'datasource % version % is %; it cannot go back to draft',
                    NEW.datasource_id, NEW.version, OLD.state
                USING ERRCODE = 'DSR05';
        END IF;
    END IF;

    IF NEW.state = 'published' AND (TG_OP = 'INSERT' OR OLD.state <> 'published') THEN
        -- Lock the datasource row first: two concurrent publishers of one datasource serialize
        -- here (READ COMMITTED); the second one then sees the first one's version as published
        -- and archives it below, so the unique index never trips.
        SELECT status INTO v_status FROM datasources WHERE id = NEW.datasource_id FOR UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'datasource % does not exist; version % cannot be published',
                    NEW.datasource_id, NEW.version
                USING ERRCODE = 'DSR01';
        END IF;
        IF v_status = 'archived' THEN
            RAISE EXCEPTION 'datasource % is archived; version % cannot be published',
                    NEW.datasource_id, NEW.version
                USING ERRCODE = 'DSR03';
        END IF;

        -- Archive the version this one replaces. Its AFTER trigger fires at the end of this
        -- nested statement, before NEW is even stored, so it cannot tell "replaced" from
        -- "unpublished" by looking at the table: the flag tells it. set_config(..., true) is
        -- transaction-local and reverts with a failed (sub)transaction.
        PERFORM set_config('dsreg.superseding', NEW.datasource_id::text, true);
        UPDATE datasource_versions SET state = 'archived'
         WHERE datasource_id = NEW.datasource_id AND state = 'published' AND version <> NEW.version;
        PERFORM set_config('dsreg.superseding', '', true);

        NEW.published_at := now();
        NEW.published_by := dsreg_actor();
    END IF;
    RETURN NEW;
END
$$;

CREATE FUNCTION dsreg_versions_after() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_previous integer;
    v_actor    text := dsreg_actor();
BEGIN
    IF NEW.state = 'published' AND (TG_OP = 'INSERT' OR OLD.state <> 'published') THEN
        -- Became published: move current_version, record where it came from.
        SELECT current_version INTO v_previous FROM datasources WHERE id = NEW.datasource_id;
        UPDATE datasources SET current_version = NEW.version, updated_by = v_actor
         WHERE id = NEW.datasource_id;
        INSERT INTO datasource_events (datasource_id, type, version, actor, payload)
        VALUES (NEW.datasource_id,
                CASE WHEN v_previous IS NOT NULL AND NEW.version < v_previous
                     THEN 'rolled_back' ELSE 'published' END,
                NEW.version, v_actor,
                jsonb_build_object('previous_version', v_previous));

    ELSIF TG_OP = 'UPDATE' AND OLD.state = 'published' AND NEW.state <> 'published' THEN
        -- Left published. It is a plain unpublish only if it is not being replaced: not the
        -- archive step of dsreg_versions_before (flag), it is still the current version, and no
        -- other version of the datasource is published once this statement is done (AFTER ROW
        -- triggers fire at the end of the statement, e.g. a one-statement swap).
        IF coalesce(current_setting('dsreg.superseding', true), '') = OLD.datasource_id::text THEN
            RETURN NULL;
        END IF;
        IF EXISTS (SELECT 1 FROM datasources
                    WHERE id = OLD.datasource_id AND current_version = OLD.version)
           AND NOT EXISTS (SELECT 1 FROM datasource_versions
                            WHERE datasource_id = OLD.datasource_id AND state = 'published')
        THEN
            UPDATE datasources SET current_version = NULL, updated_by = v_actor
             WHERE id = OLD.datasource_id;
            INSERT INTO datasource_events (datasource_id, type, version, actor, payload)
            VALUES (OLD.datasource_id, 'unpublished', OLD.version, v_actor,
                    jsonb_build_object('previous_version', OLD.version));
        END IF;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER datasource_versions_before
    BEFORE INSERT OR UPDATE OF state, config ON datasource_versions
    FOR EACH ROW EXECUTE FUNCTION dsreg_versions_before();

CREATE TRIGGER datasource_versions_after
    AFTER INSERT OR UPDATE OF state ON datasource_versions
    FOR EACH ROW EXECUTE FUNCTION dsreg_versions_after();

-- ---------------------------------------------------------------------------------------------
-- datasources triggers
-- ---------------------------------------------------------------------------------------------

-- A new datasource gets its runtime row (desired running) and a 'created' event.
CREATE FUNCTION dsreg_datasources_after_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO datasource_state (datasource_id, desired) VALUES (NEW.id, 'running')
        ON CONFLICT (datasource_id) DO NOTHING;
    INSERT INTO datasource_events (datasource_id, type) VALUES (NEW.id, 'created');
    RETURN NULL;
END
$$;

-- Every UPDATE bumps the etag. current_version is owned by the version triggers: a direct
-- write (trigger depth 1) is ignored; theirs come in at depth 2.
CREATE FUNCTION dsreg_datasources_before_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.revision := OLD.revision + 1;
    NEW.updated_at := now();
    IF NEW.status = 'archived' AND OLD.status <> 'archived' THEN
        NEW.archived_at := now();
    ELSIF NEW.status <> 'archived' THEN
        NEW.archived_at := NULL;  -- un-archived: the timestamp would be a lie
    END IF;
    IF pg_trigger_depth() < 2 THEN
        NEW.current_version := OLD.current_version;
    END IF;
    RETURN NEW;
END
$$;

CREATE FUNCTION dsreg_datasources_after_status() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO datasource_events (datasource_id, type, payload)
    VALUES (NEW.id,
            CASE NEW.status WHEN 'active' THEN 'enabled' ELSE NEW.status END,  -- disabled, archived
            jsonb_build_object('from', OLD.status, 'to', NEW.status));
    RETURN NULL;
END
$$;

CREATE TRIGGER datasources_after_insert
    AFTER INSERT ON datasources
    FOR EACH ROW EXECUTE FUNCTION dsreg_datasources_after_insert();

CREATE TRIGGER datasources_before_update
    BEFORE UPDATE ON datasources
    FOR EACH ROW EXECUTE FUNCTION dsreg_datasources_before_update();

CREATE TRIGGER datasources_after_status
    AFTER UPDATE OF status ON datasources
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION dsreg_datasources_after_status();

-- ---------------------------------------------------------------------------------------------
-- datasource_events triggers
-- ---------------------------------------------------------------------------------------------

CREATE FUNCTION dsreg_events_before() RETURNS trigger
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
    -- The outbox reader's no-skip rule depends on this being the writer's transaction.
    NEW.xid := pg_current_xact_id();
    RETURN NEW;
END
$$;

-- Wake listeners with a small JSON (never config or payload). At most 16 detailed
-- notifications per transaction, then '{"more":true}', which Postgres delivers once per
-- transaction (identical payloads are folded): a 1,000-row publish sends at most 17.
-- Listeners treat "more" as "catch up from your cursor". Notifications are sent on commit only.
CREATE FUNCTION dsreg_events_notify() RETURNS trigger
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
            json_build_object('id', NEW.id, 'datasource_id', NEW.datasource_id, 'type', NEW.type)::text);
    ELSE
        PERFORM pg_notify('dsreg_events', '{"more":true}');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER datasource_events_before
    BEFORE INSERT ON datasource_events
    FOR EACH ROW EXECUTE FUNCTION dsreg_events_before();

CREATE TRIGGER datasource_events_notify
    AFTER INSERT ON datasource_events
    FOR EACH ROW EXECUTE FUNCTION dsreg_events_notify();

-- ---------------------------------------------------------------------------------------------
-- Functions for SQL publishers: the same checks as the API (which calls them too).
-- ---------------------------------------------------------------------------------------------

-- Publishes a version. Returns the id of the event written, or NULL when the version already
-- was the published one (idempotent, no event).
CREATE FUNCTION dsreg_publish(p_datasource uuid, p_version integer, p_actor text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_status text;
    v_state  text;
    v_event  bigint;
BEGIN
    IF coalesce(p_actor, '') <> '' THEN
        PERFORM set_config('dsreg.actor', p_actor, true);
    END IF;

    SELECT status INTO v_status FROM datasources WHERE id = p_datasource FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'datasource % does not exist; version % cannot be published', p_datasource, p_version
            USING ERRCODE = 'DSR01';
    END IF;
    IF v_status = 'archived' THEN
        RAISE EXCEPTION 'datasource % is archived; version % cannot be published', p_datasource, p_version
            USING ERRCODE = 'DSR03';
    END IF;

    SELECT state INTO v_state FROM datasource_versions
     WHERE datasource_id = p_datasource AND version = p_version;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'datasource % has no version %', p_datasource, p_version
            USING ERRCODE = 'DSR02';
    END IF;
    IF v_state = 'published' THEN
        RETURN NULL;
    END IF;

    UPDATE datasource_versions SET state = 'published'
     WHERE datasource_id = p_datasource AND version = p_version;

    SELECT id INTO v_event FROM datasource_events
     WHERE datasource_id = p_datasource AND xid = pg_current_xact_id()
       AND type IN ('published', 'rolled_back') AND version = p_version
     ORDER BY id DESC LIMIT 1;
    RETURN v_event;
END
$$;

-- Publishes an earlier (or the given) previously published version again. Returns the version
-- now published. Without p_to_version: the greatest once-published version below the current.
CREATE FUNCTION dsreg_rollback(p_datasource uuid, p_to_version integer DEFAULT NULL, p_actor text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_status    text;
    v_current   integer;
    v_target    integer;
    v_state     text;
    v_published timestamptz;
BEGIN
    IF coalesce(p_actor, '') <> '' THEN
        PERFORM set_config('dsreg.actor', p_actor, true);
    END IF;

    SELECT status, current_version INTO v_status, v_current
      FROM datasources WHERE id = p_datasource FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'datasource % does not exist; it cannot be rolled back', p_datasource
            USING ERRCODE = 'DSR01';
    END IF;
    IF v_status = 'archived' THEN
        RAISE EXCEPTION 'datasource % is archived; it cannot be rolled back', p_datasource
            USING ERRCODE = 'DSR03';
    END IF;

    IF p_to_version IS NULL THEN
        IF v_current IS NULL THEN
            RAISE EXCEPTION 'datasource % has no published version; there is nothing to roll back from', p_datasource
                USING ERRCODE = 'DSR04';
        END IF;
        SELECT max(version) INTO v_target FROM datasource_versions
         WHERE datasource_id = p_datasource AND version < v_current AND published_at IS NOT NULL;
        IF v_target IS NULL THEN
            RAISE EXCEPTION 'datasource % has no version earlier than % that was ever published', p_datasource, v_current
                USING ERRCODE = 'DSR04';
        END IF;
    ELSE
        v_target := p_to_version;
        SELECT published_at INTO v_published FROM datasource_versions
         WHERE datasource_id = p_datasource AND version = v_target;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'datasource % has no version %', p_datasource, v_target
                USING ERRCODE = 'DSR02';
        END IF;
        IF v_published IS NULL THEN
            RAISE EXCEPTION 'datasource % version % was never published; it cannot be a rollback target', p_datasource, v_target
                USING ERRCODE = 'DSR06';
        END IF;
    END IF;

    SELECT state INTO v_state FROM datasource_versions
     WHERE datasource_id = p_datasource AND version = v_target;
    IF v_state = 'published' THEN
        RETURN v_target;  -- already current: nothing to do, no event
    END IF;

    -- The triggers archive the current version and write 'rolled_back' (or 'published' when
    -- the given target is newer than the current one).
    UPDATE datasource_versions SET state = 'published'
     WHERE datasource_id = p_datasource AND version = v_target;
    RETURN v_target;
END
$$;
