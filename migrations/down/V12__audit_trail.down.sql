DROP TABLE dsreg_page_key;
DROP TRIGGER datasource_events_audit_sql ON datasource_events;
DROP FUNCTION dsreg_audit_sql_publish();
DROP TRIGGER audit_log_no_truncate ON audit_log;
DROP TRIGGER audit_log_append_only ON audit_log;
DROP FUNCTION dsreg_audit_append_only();
DROP INDEX audit_log_org_at_idx;
DROP INDEX audit_log_caller_org_at_idx;
DROP INDEX audit_log_denial_window_idx;
ALTER TABLE audit_log
    DROP COLUMN window_start,
    DROP COLUMN last_at,
    DROP COLUMN count,
    DROP COLUMN db_role,
    DROP COLUMN via,
    DROP COLUMN reason_class,
    DROP COLUMN target_id,
    DROP COLUMN caller_projects,
    DROP COLUMN caller_org;
