-- Training jobs in PostgreSQL: the SQLite table (../0001_jobs.sql) plus the
-- lease of the worker running each one. Times the job shows are Unix
-- seconds written by the processes; lease expiry uses the database's clock,
-- so workers on machines whose clocks differ agree on it.
CREATE TABLE jobs (
    id               TEXT PRIMARY KEY,
    spec             JSONB NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    created_at       DOUBLE PRECISION NOT NULL,
    started_at       DOUBLE PRECISION,
    finished_at      DOUBLE PRECISION,
    progress         JSONB,
    history          JSONB NOT NULL DEFAULT '[]',
    curve            JSONB NOT NULL DEFAULT '[]',
    model            TEXT,
    error            TEXT,
    cancel_requested BOOLEAN NOT NULL DEFAULT false,
    attempts         INTEGER NOT NULL DEFAULT 0,
    worker           TEXT,          -- the worker holding the lease
    lease_expires    TIMESTAMPTZ    -- past it, another worker may claim the job
);
CREATE INDEX jobs_status_created ON jobs (status, created_at, id);
-- One queued or running job per model name, across every replica: the
-- second POST /jobs for a name fails here even if two replicas race.
CREATE UNIQUE INDEX jobs_active_model_name ON jobs ((spec->>'model_name'))
    WHERE status IN ('queued', 'running');

-- Every change another process should hear about: 'state' (inserted or a
-- new status), 'epoch' (history), 'progress', 'cancel' (asked to stop).
-- The payload is "<kind> <job id> <application_name>", so a process can
-- skip what it did itself. Lease renewals notify nobody.
CREATE FUNCTION convscope_jobs_notify() RETURNS trigger AS $$
DECLARE
    kind TEXT;
BEGIN
    IF TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM NEW.status THEN
        kind := 'state';
    ELSIF OLD.history IS DISTINCT FROM NEW.history THEN
        kind := 'epoch';
    ELSIF OLD.progress IS DISTINCT FROM NEW.progress THEN
        kind := 'progress';
    ELSIF OLD.cancel_requested IS DISTINCT FROM NEW.cancel_requested THEN
        kind := 'cancel';
    ELSE
        RETURN NEW;
    END IF;
    PERFORM pg_notify('convscope_jobs', kind || ' ' || NEW.id || ' ' || current_setting('application_name'));
    RETURN NEW;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER jobs_notify AFTER INSERT OR UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION convscope_jobs_notify();
