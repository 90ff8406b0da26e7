-- Reverts V3__dead_letters.sql.
DROP TABLE IF EXISTS datasource_dead_letters;
