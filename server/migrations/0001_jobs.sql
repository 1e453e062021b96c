-- Training jobs. One row per job; the worker claims the oldest queued row.
CREATE TABLE jobs (
    id               TEXT PRIMARY KEY,
    spec             TEXT NOT NULL,               -- the job body, JSON
    status           TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    created_at       REAL NOT NULL,               -- Unix seconds
    started_at       REAL,
    finished_at      REAL,
    progress         TEXT,                        -- JSON: epoch, epochs, step, steps, fraction, loss
    history          TEXT NOT NULL DEFAULT '[]',  -- JSON: one record per completed epoch
    curve            TEXT NOT NULL DEFAULT '[]',  -- JSON: [fraction, loss] at each progress report
    model            TEXT,                        -- the registered model, on success
    error            TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts         INTEGER NOT NULL DEFAULT 0   -- starts, counting resumes after a crash
);
CREATE INDEX jobs_status_created ON jobs (status, created_at);
