//! Where jobs live: a small trait, SQLite behind it for one process, and
//! PostgreSQL ([`super::postgres`]) for several.
//!
//! The worker speaks only to [`JobStore`]. The methods with defaults
//! (leases, notices) matter only where other processes share the store;
//! SQLite, one process's own, keeps the defaults. SQLite runs in WAL mode
//! with `synchronous=FULL`: a state change that returned is on disk.
//! Schema migrations are the numbered files in `server/migrations/`,
//! applied in order and recorded in `PRAGMA user_version`.

use std::path::Path;
use std::sync::Mutex;

use model_store::train::{EpochRecord, Progress};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use utoipa::ToSchema;

/// A job's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Waiting for a worker.
    Queued,
    /// Training.
    Running,
    /// Its model is registered.
    Succeeded,
    /// Stopped by an error (see `error`).
    Failed,
    /// Stopped on request; nothing registered.
    Cancelled,
}

impl Status {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    /// Every state, for metrics.
    pub const ALL: [Status; 5] = [
        Status::Queued,
        Status::Running,
        Status::Succeeded,
        Status::Failed,
        Status::Cancelled,
    ];

    /// The state a stored name means.
    pub(crate) fn parse(s: &str) -> Status {
        match s {
            "queued" => Status::Queued,
            "running" => Status::Running,
            "succeeded" => Status::Succeeded,
            "cancelled" => Status::Cancelled,
            _ => Status::Failed,
        }
    }

    /// Finished one way or another.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Cancelled)
    }
}

/// A job as stored.
#[derive(Debug, Clone)]
pub struct JobRecord {
    /// Its id.
    pub id: String,
    /// The job body.
    pub spec: serde_json::Value,
    /// Its state.
    pub status: Status,
    /// Unix seconds.
    pub created_at: f64,
    /// When a worker last started it.
    pub started_at: Option<f64>,
    /// When it ended.
    pub finished_at: Option<f64>,
    /// The last progress report.
    pub progress: Option<Progress>,
    /// One record per completed epoch.
    pub history: Vec<EpochRecord>,
    /// `[fraction, loss]` at each progress report (the plot's loss curve).
    pub curve: Vec<[f64; 2]>,
    /// The registered model, on success.
    pub model: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// Cancellation was asked for.
    pub cancel_requested: bool,
    /// Starts so far (more than one after a crash).
    pub attempts: u32,
    /// The worker holding its lease (shared stores only).
    pub worker: Option<String>,
    /// The last epoch whose resume state is in object storage (0: none, or
    /// no object storage).
    pub resume_epoch: u32,
}

/// A change another process made, heard through a shared store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// `kind` is `state`, `epoch`, `progress` or `cancel` for job `id`, or
    /// `models` when the catalogue's row `id` changed.
    Job {
        /// What changed.
        kind: &'static str,
        /// The job.
        id: String,
    },
    /// Notices may have been lost (the listening connection was down):
    /// read everything again.
    Resync,
}

/// A job this process runs, as a heartbeat found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The job.
    pub id: String,
    /// Someone asked it to stop.
    pub cancel_requested: bool,
}

/// What a cancel request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was queued and is now cancelled.
    Cancelled,
    /// It is running; the worker stops it after the current batch.
    Requested,
    /// It had already ended.
    AlreadyFinal(Status),
    /// No such job.
    NotFound,
}

/// What can go wrong in the job store: all of it is the server's fault,
/// answered as a 500 and logged.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("job store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL answered with an error.
    #[error("job store: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// PostgreSQL cannot be reached now (answered 503 with `Retry-After`).
    #[error("the job store is unreachable: {0}")]
    Unavailable(String),
    /// Another queued or running job holds the name (a race between
    /// replicas, settled by the database).
    #[error("{0}")]
    Conflict(String),
    /// Its directory could not be made.
    #[error("job store: {path}: {source}")]
    Io {
        /// The directory.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Store result.
pub type StoreResult<T> = Result<T, StoreError>;

/// The durable queue every worker and handler uses.
pub trait JobStore: Send + Sync {
    /// Adds a queued job.
    fn insert(&self, id: &str, spec: &serde_json::Value) -> StoreResult<JobRecord>;
    /// One job.
    fn get(&self, id: &str) -> StoreResult<Option<JobRecord>>;
    /// All jobs, newest first.
    fn list(&self) -> StoreResult<Vec<JobRecord>>;
    /// Atomically moves the oldest queued job to running and returns it.
    fn claim_next(&self) -> StoreResult<Option<JobRecord>>;
    /// Records a progress report (and a point of the loss curve).
    fn progress(&self, id: &str, progress: &Progress) -> StoreResult<()>;
    /// Records the epoch history.
    fn history(&self, id: &str, history: &[EpochRecord]) -> StoreResult<()>;
    /// Ends a job.
    fn finish(
        &self,
        id: &str,
        status: Status,
        model: Option<&str>,
        error: Option<&str>,
    ) -> StoreResult<()>;
    /// Cancels a queued job, or asks a running one to stop.
    fn cancel(&self, id: &str) -> StoreResult<CancelOutcome>;
    /// Whether a running job was asked to stop.
    fn cancel_requested(&self, id: &str) -> StoreResult<bool>;
    /// After a crash: jobs left `running` go back to `queued` (their work
    /// directories let them resume). Returns their ids.
    fn requeue_interrupted(&self) -> StoreResult<Vec<String>>;
    /// Jobs per state.
    fn counts(&self) -> StoreResult<Vec<(Status, u64)>>;
    /// `(job id, model_name)` of every queued or running job: the names
    /// they hold in the model store.
    fn active(&self) -> StoreResult<Vec<(String, String)>>;

    /// Whether other processes share this store: then their changes come
    /// as [`Notice`]s, and names and models are synchronised from it.
    fn shared(&self) -> bool {
        false
    }
    /// Renews the lease of every job this process runs; the jobs still its
    /// own (a job missing was lost: its lease expired and another worker
    /// took it). `None`: this store has no leases.
    fn heartbeat(&self) -> StoreResult<Option<Vec<Lease>>> {
        Ok(None)
    }
    /// Gives a running job back to the queue at once (a worker stopping
    /// after an epoch): another worker resumes it without waiting for the
    /// lease to expire. Without leases, the next start requeues it.
    fn release_lease(&self, _id: &str) -> StoreResult<()> {
        Ok(())
    }
    /// How long a claim lasts without a heartbeat (`None`: no leases).
    fn lease(&self) -> Option<std::time::Duration> {
        None
    }
    /// Whether this process still holds job `id`'s lease (always, without
    /// leases): asked before a job's result is registered or removed.
    fn still_mine(&self, _id: &str) -> StoreResult<bool> {
        Ok(true)
    }
    /// Sends every change another process makes to `tx`, for as long as
    /// `tx`'s receiver lives.
    fn listen(&self, _tx: std::sync::mpsc::Sender<Notice>) {}
}

/// The migrations, in order; `user_version` says how many have run.
const MIGRATIONS: &[&str] = &[include_str!("../../migrations/0001_jobs.sql")];

/// SQLite behind a mutex (one connection: the store is not the bottleneck
/// of jobs that train for minutes).
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

const COLUMNS: &str = "id, spec, status, created_at, started_at, finished_at, progress, history, curve, model, error, cancel_requested, attempts";

fn row(r: &rusqlite::Row) -> rusqlite::Result<JobRecord> {
    let json = |i: usize| -> rusqlite::Result<Option<String>> { r.get(i) };
    Ok(JobRecord {
        id: r.get(0)?,
        spec: serde_json::from_str(&r.get::<_, String>(1)?).unwrap_or(serde_json::Value::Null),
        status: Status::parse(&r.get::<_, String>(2)?),
        created_at: r.get(3)?,
        started_at: r.get(4)?,
        finished_at: r.get(5)?,
        progress: json(6)?.and_then(|s| serde_json::from_str(&s).ok()),
        history: json(7)?
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default(),
        curve: json(8)?
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default(),
        model: r.get(9)?,
        error: r.get(10)?,
        cancel_requested: r.get::<_, i64>(11)? != 0,
        attempts: r.get::<_, i64>(12)? as u32,
        worker: None,
        resume_epoch: 0,
    })
}

impl SqliteStore {
    /// Opens (creating) the database at `path` and migrates it.
    pub fn open(path: &Path) -> StoreResult<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl JobStore for SqliteStore {
    fn insert(&self, id: &str, spec: &serde_json::Value) -> StoreResult<JobRecord> {
        let c = self.conn();
        c.execute(
            "INSERT INTO jobs (id, spec, status, created_at) VALUES (?1, ?2, 'queued', ?3)",
            params![id, spec.to_string(), now()],
        )?;
        let r = c.query_row(
            &format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"),
            [id],
            row,
        )?;
        Ok(r)
    }

    fn get(&self, id: &str) -> StoreResult<Option<JobRecord>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"),
                [id],
                row,
            )
            .optional()?)
    }

    fn list(&self) -> StoreResult<Vec<JobRecord>> {
        let c = self.conn();
        let mut st = c.prepare(&format!(
            "SELECT {COLUMNS} FROM jobs ORDER BY created_at DESC, id"
        ))?;
        let rows = st.query_map([], row)?.collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn claim_next(&self) -> StoreResult<Option<JobRecord>> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        let id: Option<String> = tx
            .query_row(
                "SELECT id FROM jobs WHERE status = 'queued' ORDER BY created_at, id LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        let Some(id) = id else {
            return Ok(None);
        };
        tx.execute(
            "UPDATE jobs SET status = 'running', started_at = ?2, attempts = attempts + 1 WHERE id = ?1",
            params![id, now()],
        )?;
        let r = tx.query_row(
            &format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"),
            [&id],
            row,
        )?;
        tx.commit()?;
        Ok(Some(r))
    }

    fn progress(&self, id: &str, progress: &Progress) -> StoreResult<()> {
        let p = serde_json::to_string(progress).expect("progress serialises");
        self.conn().execute(
            "UPDATE jobs SET progress = ?2, curve = json_insert(curve, '$[#]', json_array(?3, ?4)) WHERE id = ?1",
            params![id, p, progress.fraction, progress.loss],
        )?;
        Ok(())
    }

    fn history(&self, id: &str, history: &[EpochRecord]) -> StoreResult<()> {
        let h = serde_json::to_string(history).expect("history serialises");
        self.conn()
            .execute("UPDATE jobs SET history = ?2 WHERE id = ?1", params![id, h])?;
        Ok(())
    }

    fn finish(
        &self,
        id: &str,
        status: Status,
        model: Option<&str>,
        error: Option<&str>,
    ) -> StoreResult<()> {
        self.conn().execute(
            "UPDATE jobs SET status = ?2, model = ?3, error = ?4, finished_at = ?5 WHERE id = ?1",
            params![id, status.as_str(), model, error, now()],
        )?;
        Ok(())
    }

    fn cancel(&self, id: &str) -> StoreResult<CancelOutcome> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        let status: Option<String> = tx
            .query_row("SELECT status FROM jobs WHERE id = ?1", [id], |r| r.get(0))
            .optional()?;
        let outcome = match status.as_deref().map(Status::parse) {
            None => CancelOutcome::NotFound,
            Some(Status::Queued) => {
                tx.execute(
                    "UPDATE jobs SET status = 'cancelled', cancel_requested = 1, finished_at = ?2 WHERE id = ?1",
                    params![id, now()],
                )?;
                CancelOutcome::Cancelled
            }
            Some(Status::Running) => {
                tx.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?1", [id])?;
                CancelOutcome::Requested
            }
            Some(s) => CancelOutcome::AlreadyFinal(s),
        };
        tx.commit()?;
        Ok(outcome)
    }

    fn cancel_requested(&self, id: &str) -> StoreResult<bool> {
        Ok(self
            .conn()
            .query_row(
                "SELECT cancel_requested FROM jobs WHERE id = ?1",
                [id],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .is_some_and(|v| v != 0))
    }

    fn requeue_interrupted(&self) -> StoreResult<Vec<String>> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        let ids: Vec<String> = {
            let mut st = tx.prepare("SELECT id FROM jobs WHERE status = 'running'")?;
            st.query_map([], |r| r.get(0))?
                .collect::<Result<Vec<_>, _>>()?
        };
        tx.execute(
            "UPDATE jobs SET status = 'queued' WHERE status = 'running'",
            [],
        )?;
        tx.commit()?;
        Ok(ids)
    }

    fn active(&self) -> StoreResult<Vec<(String, String)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, COALESCE(json_extract(spec, '$.model_name'), '') FROM jobs WHERE status IN ('queued', 'running')",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn counts(&self) -> StoreResult<Vec<(Status, u64)>> {
        let c = self.conn();
        let mut st = c.prepare("SELECT status, COUNT(*) FROM jobs GROUP BY status")?;
        let found: Vec<(String, i64)> = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        Ok(Status::ALL
            .iter()
            .map(|s| {
                let n = found
                    .iter()
                    .find(|(name, _)| name == s.as_str())
                    .map_or(0, |(_, n)| *n as u64);
                (*s, n)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_survive_reopening_and_interrupted_ones_are_requeued() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.sqlite3");
        {
            let s = SqliteStore::open(&path).unwrap();
            s.insert("a", &serde_json::json!({"x": 1})).unwrap();
            s.insert("b", &serde_json::json!({"x": 2})).unwrap();
            let claimed = s.claim_next().unwrap().unwrap();
            assert_eq!(claimed.id, "a");
            assert_eq!(claimed.status, Status::Running);
            assert_eq!(s.cancel("b").unwrap(), CancelOutcome::Cancelled);
            assert_eq!(
                s.cancel("b").unwrap(),
                CancelOutcome::AlreadyFinal(Status::Cancelled)
            );
            assert_eq!(s.cancel("nope").unwrap(), CancelOutcome::NotFound);
        }
        // "Crash": reopen; the running job is queued again, attempts kept.
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.requeue_interrupted().unwrap(), vec!["a".to_string()]);
        let again = s.claim_next().unwrap().unwrap();
        assert_eq!((again.id.as_str(), again.attempts), ("a", 2));
        assert!(s.claim_next().unwrap().is_none());
        s.insert("c", &serde_json::json!({"model_name": "m"}))
            .unwrap();
        let mut active = s.active().unwrap();
        active.sort();
        assert_eq!(active[1], ("c".to_string(), "m".to_string()));
        assert_eq!(active[0].0, "a");
        assert_eq!(active.len(), 2, "the cancelled job holds no name");
        let counts = s.counts().unwrap();
        assert!(counts.contains(&(Status::Running, 1)));
        assert!(counts.contains(&(Status::Cancelled, 1)));
    }
}
