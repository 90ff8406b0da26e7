-- Reverts V15__day2_operations.sql.
ALTER TABLE datasource_state DROP COLUMN IF EXISTS failing_since;
DROP INDEX IF EXISTS datasource_dead_letters_at_idx;
ALTER TABLE datasource_dead_letters
    DROP COLUMN IF EXISTS replayed_at,
    DROP COLUMN IF EXISTS replays;
