-- The model catalogue for object storage (--models s3://...): a row is the
-- commit point of a model, so it is visible on every replica at once or
-- nowhere. The weights are one object, named by their SHA-256 (a job's
-- final model and its last snapshot share one); the manifest is here.
CREATE TABLE models (
    name        TEXT PRIMARY KEY,
    version     TEXT NOT NULL,             -- SHA-256 of manifest and weights
    manifest    TEXT NOT NULL,
    object_key  TEXT NOT NULL,
    sha256      TEXT NOT NULL,             -- of the weights object
    bytes       BIGINT NOT NULL,
    num_classes INTEGER NOT NULL,          -- listed without loading the model
    job_id      TEXT,                      -- the job that registered it
    created_at  DOUBLE PRECISION NOT NULL
);
CREATE INDEX models_sha256 ON models (sha256);

-- Set by the process that seeds an empty catalogue with the bundled
-- models, so it happens once, and not again once a user empties it.
CREATE TABLE catalogue_seeded (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    at  TIMESTAMPTZ NOT NULL
);

-- The last epoch whose resume state is in object storage, for a worker on
-- another machine to resume from.
ALTER TABLE jobs ADD COLUMN resume_epoch INTEGER NOT NULL DEFAULT 0;

CREATE FUNCTION convscope_models_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('convscope_jobs', 'models ' || COALESCE(NEW.name, OLD.name) || ' ' || current_setting('application_name'));
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER models_notify AFTER INSERT OR UPDATE OR DELETE ON models
    FOR EACH ROW EXECUTE FUNCTION convscope_models_notify();
