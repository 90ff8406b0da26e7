-- Reverse of V1__schema.sql: drops everything V1 created, so up -> down -> up works on the
-- same database. Run in one transaction (no BEGIN/COMMIT here). Not named like a refinery
-- migration (".down.sql" does not match refinery's V{n}__{name}.sql), so refinery ignores it.
--
-- No CASCADE: an object of a later migration still depending on these is an error, not a
-- silent drop. Dropping a table drops its indices, triggers and owned bigserial sequences.

DROP TABLE IF EXISTS audit_log;
DROP TABLE IF EXISTS datasource_events;
DROP TABLE IF EXISTS datasource_secrets;
DROP TABLE IF EXISTS datasource_state;
DROP TABLE IF EXISTS datasource_versions;
DROP TABLE IF EXISTS datasources;

DROP FUNCTION IF EXISTS dsreg_rollback(uuid, integer, text);
DROP FUNCTION IF EXISTS dsreg_publish(uuid, integer, text);
DROP FUNCTION IF EXISTS dsreg_events_notify();
DROP FUNCTION IF EXISTS dsreg_events_before();
DROP FUNCTION IF EXISTS dsreg_datasources_after_status();
DROP FUNCTION IF EXISTS dsreg_datasources_before_update();
DROP FUNCTION IF EXISTS dsreg_datasources_after_insert();
DROP FUNCTION IF EXISTS dsreg_versions_after();
DROP FUNCTION IF EXISTS dsreg_versions_before();
DROP FUNCTION IF EXISTS dsreg_event_wakes(text);
DROP FUNCTION IF EXISTS dsreg_valid_traceparent(text);
DROP FUNCTION IF EXISTS dsreg_actor();
