-- V15: day-2 operations. Dead letters are listed by time and reason, replayed through the
-- published version (a refusal keeps the row with its new reason and counts the replay) and
-- pruned by age or count; a datasource's worker records since when it has failed without a
-- healthy run in between, for the give-up policy.

ALTER TABLE datasource_dead_letters
    ADD COLUMN replays     integer     NOT NULL DEFAULT 0 CHECK (replays >= 0),
    ADD COLUMN replayed_at timestamptz NULL;
COMMENT ON COLUMN datasource_dead_letters.replays IS
    'Replays that refused the record again; error_code, error and version are the latest refusal.';

CREATE INDEX datasource_dead_letters_at_idx ON datasource_dead_letters (at);

ALTER TABLE datasource_state ADD COLUMN failing_since timestamptz NULL;
COMMENT ON COLUMN datasource_state.failing_since IS
    'When the worker failed with no healthy run since; NULL while it works or is stopped.';
