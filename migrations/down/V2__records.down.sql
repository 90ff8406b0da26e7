-- Reverts V2__records.sql.
DROP TABLE IF EXISTS datasource_records;
