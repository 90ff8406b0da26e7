-- Reverts V4__secrets_generation.sql.
ALTER TABLE datasource_state DROP COLUMN IF EXISTS secrets_generation;
