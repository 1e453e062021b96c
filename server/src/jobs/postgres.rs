//! The job store several processes share: PostgreSQL (`--jobs postgres://`).
//!
//! - **Claims** take the oldest queued job, or a running one whose lease
//!   expired, with `FOR UPDATE SKIP LOCKED`, so two workers never take the
//!   same row and neither waits for the other. A claim writes the worker's
//!   name and a lease (`--lease` seconds on the database's clock); the
//!   worker renews it every second ([`JobStore::heartbeat`]). A job whose
//!   worker died is claimed again once the lease expires and resumes from
//!   its last finished epoch; past `--max-attempts` starts it fails, saying
//!   why. Every write a worker makes to a job it runs says `worker = me`, so
//!   a worker that lost its lease (paused, partitioned) changes nothing.
//! - **Notices**: a trigger (`migrations/postgres/0001_jobs.sql`) sends
//!   `NOTIFY convscope_jobs` for every change, and [`JobStore::listen`]
//!   hears them on a connection of its own, so every replica streams every
//!   job's events and sees names taken and freed. Notifications sent while
//!   that connection is down are lost: after reconnecting it says
//!   [`Notice::Resync`], and the job service also polls.
//! - **Migrations** run in one transaction under an advisory lock: processes
//!   starting together migrate once, the others wait and find it done.
//!
//! The [`JobStore`] trait is synchronous (SQLite's is, and the workers are
//! plain threads), so the store keeps a small runtime of its own for the
//! connections and waits for each query on the calling thread. A lost
//! connection is reopened on the next call (a PostgreSQL restart costs the
//! calls in flight, each answered as [`StoreError::Unavailable`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, mpsc};
use std::task::{Context as TaskContext, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use model_store::train::{EpochRecord, Progress};
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls, Row};

use super::store::{
    CancelOutcome, JobRecord, JobStore, Lease, Notice, Status, StoreError, StoreResult,
};

/// The migrations, numbered; `convscope_migrations` records those run.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../migrations/postgres/0001_jobs.sql")),
    (2, include_str!("../../migrations/postgres/0002_models.sql")),
];

/// Held (for one transaction) while migrating.
const MIGRATION_LOCK: i64 = 0x636f_6e76_7363_6f70;

/// How long a connection attempt or a query may take before the database
/// counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const QUERY_TIMEOUT: Duration = Duration::from_secs(15);

const COLUMNS: &str = "id, spec, status, created_at, started_at, finished_at, progress, history, curve, model, error, cancel_requested, attempts, worker, resume_epoch";

/// The advisory lock of a name or a hash: one 64-bit key. A model
/// commit ([`crate::storage`]) and a job insert both take the name's, so
/// neither can miss the other's row.
pub(crate) fn lock_key(kind: &str, what: &str) -> i64 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(format!("convscope:{kind}:{what}").as_bytes());
    i64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// Where the store is and who this process is in it.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// `postgres://user@host/db` (libpq's URL or key=value forms).
    pub url: String,
    /// This process's name: the lease holder written on its jobs and the
    /// `application_name` its notices carry.
    pub instance: String,
    /// How long a claimed job stays this worker's without a heartbeat.
    pub lease: Duration,
    /// Starts after which a job whose worker keeps dying fails.
    pub max_attempts: u32,
}

/// PostgreSQL behind the [`JobStore`] trait.
pub struct PgStore {
    rt: Option<tokio::runtime::Runtime>,
    config: Config,
    client: Mutex<Option<Client>>,
    /// A second connection for the model catalogue, whose commits hold
    /// theirs for a whole upload: heartbeats and job reads never wait on one.
    catalogue: Mutex<Option<Client>>,
    opts: PgOptions,
}

/// A query on the store's connection, borrowing it.
pub(crate) type Query<'c, T> =
    Pin<Box<dyn Future<Output = Result<T, tokio_postgres::Error>> + Send + 'c>>;

impl PgStore {
    /// Connects and migrates; fails if the database cannot be reached.
    pub fn open(mut opts: PgOptions) -> StoreResult<Self> {
        // PostgreSQL keeps 63 bytes of application_name, and notices are
        // told apart by it.
        while opts.instance.len() > 63 {
            opts.instance.pop();
        }
        let mut config: Config = opts
            .url
            .parse()
            .map_err(|e: tokio_postgres::Error| StoreError::Unavailable(format!("--jobs: {e}")))?;
        config
            .application_name(&opts.instance)
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives_idle(Duration::from_secs(10));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("job-store")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable(format!("cannot start its runtime: {e}")))?;
        let store = Self {
            rt: Some(rt),
            config,
            client: Mutex::new(None),
            catalogue: Mutex::new(None),
            opts,
        };
        store.migrate()?;
        Ok(store)
    }

    /// This process's name in the store.
    pub fn instance(&self) -> &str {
        &self.opts.instance
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("the runtime lives until drop")
    }

    fn connect(&self) -> StoreResult<Client> {
        let (tx, rx) = mpsc::channel();
        let config = self.config.clone();
        self.rt().spawn(async move {
            let connected = config.connect(NoTls).await.map(|(client, connection)| {
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::warn!(error = %e, "job store connection ended");
                    }
                });
                client
            });
            let _ = tx.send(connected);
        });
        match rx.recv_timeout(CONNECT_TIMEOUT + Duration::from_secs(1)) {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e)) => Err(StoreError::Unavailable(e.to_string())),
            Err(_) => Err(StoreError::Unavailable(format!(
                "no connection within {} s",
                CONNECT_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Runs `query` on the connection (opened or reopened as needed). A
    /// query that fails because the connection died is tried once more on
    /// a new one: every query here may run twice without harm.
    fn with<T>(&self, query: impl for<'c> Fn(&'c mut Client) -> Query<'c, T>) -> StoreResult<T> {
        self.with_on(&self.client, QUERY_TIMEOUT, query)
    }

    /// [`PgStore::with`] on the catalogue's connection ([`crate::storage`]).
    pub(crate) fn with_pg<T>(
        &self,
        query: impl for<'c> Fn(&'c mut Client) -> Query<'c, T>,
    ) -> StoreResult<T> {
        self.with_on(&self.catalogue, QUERY_TIMEOUT, query)
    }

    /// The same, waiting up to `timeout` (a commit that uploads weights).
    pub(crate) fn with_pg_for<T>(
        &self,
        timeout: Duration,
        query: impl for<'c> Fn(&'c mut Client) -> Query<'c, T>,
    ) -> StoreResult<T> {
        self.with_on(&self.catalogue, timeout, query)
    }

    fn with_on<T>(
        &self,
        slot: &Mutex<Option<Client>>,
        timeout: Duration,
        query: impl for<'c> Fn(&'c mut Client) -> Query<'c, T>,
    ) -> StoreResult<T> {
        let mut guard = slot.lock().unwrap_or_else(|e| e.into_inner());
        let mut tries = 0;
        loop {
            tries += 1;
            if guard.as_ref().is_none_or(Client::is_closed) {
                *guard = Some(self.connect()?);
            }
            let client = guard.as_mut().expect("connected above");
            let lost = match block_on(query(client), timeout) {
                Some(Ok(v)) => return Ok(v),
                Some(Err(e)) if !e.is_closed() && !client.is_closed() => {
                    return Err(StoreError::Postgres(e));
                }
                Some(Err(e)) => e.to_string(),
                None => format!("no answer within {} s", timeout.as_secs()),
            };
            *guard = None;
            if tries == 2 {
                return Err(StoreError::Unavailable(lost));
            }
        }
    }

    fn migrate(&self) -> StoreResult<()> {
        self.with(|c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                // "already exists, skipping" is no news.
                tx.batch_execute("SET LOCAL client_min_messages = warning")
                    .await?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                    .await?;
                tx.batch_execute(
                    "CREATE TABLE IF NOT EXISTS convscope_migrations (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
                )
                .await?;
                let done: Vec<i32> = tx
                    .query("SELECT version FROM convscope_migrations", &[])
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                for (version, sql) in MIGRATIONS {
                    if !done.contains(version) {
                        tx.batch_execute(sql).await?;
                        tx.execute(
                            "INSERT INTO convscope_migrations (version) VALUES ($1)",
                            &[version],
                        )
                        .await?;
                    }
                }
                tx.commit().await
            })
        })
    }

    /// Runs `fut` on the store's runtime (it needs a reactor: object
    /// storage calls), waiting up to `timeout` on this thread.
    pub(crate) fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
        timeout: Duration,
    ) -> Option<T> {
        let (tx, rx) = mpsc::channel();
        self.rt().spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv_timeout(timeout).ok()
    }

    /// The store's runtime, to spawn on from inside a query.
    pub(crate) fn handle(&self) -> tokio::runtime::Handle {
        self.rt().handle().clone()
    }

    fn lease_secs(&self) -> f64 {
        self.opts.lease.as_secs_f64()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Dropped from async code too (a test's server): no blocking here.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn record(r: &Row) -> JobRecord {
    fn json<T: serde::de::DeserializeOwned>(v: Option<serde_json::Value>) -> Option<T> {
        v.and_then(|v| serde_json::from_value(v).ok())
    }
    JobRecord {
        id: r.get(0),
        spec: r.get(1),
        status: Status::parse(r.get(2)),
        created_at: r.get(3),
        started_at: r.get(4),
        finished_at: r.get(5),
        progress: json(r.get(6)),
        history: json(r.get(7)).unwrap_or_default(),
        curve: json(r.get(8)).unwrap_or_default(),
        model: r.get(9),
        error: r.get(10),
        cancel_requested: r.get(11),
        attempts: r.get::<_, i32>(12).max(0) as u32,
        worker: r.get(13),
        resume_epoch: r.get::<_, i32>(14).max(0) as u32,
    }
}

impl JobStore for PgStore {
    fn insert(&self, id: &str, spec: &serde_json::Value) -> StoreResult<JobRecord> {
        // Not for a name the model catalogue has (object storage): the
        // replicas' own views of it may lag.
        let sql = format!(
            "INSERT INTO jobs (id, spec, status, created_at) SELECT $1, $2, 'queued', $3 \
             WHERE NOT EXISTS (SELECT 1 FROM models WHERE name = $2::jsonb->>'model_name') RETURNING {COLUMNS}"
        );
        let created = now();
        let inserted = self.with(|c| {
            let (sql, id, spec) = (sql.clone(), id.to_owned(), spec.clone());
            let lock = lock_key("name", spec["model_name"].as_str().unwrap_or_default());
            Box::pin(async move {
                let tx = c.transaction().await?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock])
                    .await?;
                let row = tx.query_opt(&sql, &[&id, &spec, &created]).await?;
                tx.commit().await?;
                Ok(row)
            })
        });
        match inserted {
            Ok(Some(row)) => Ok(record(&row)),
            Ok(None) => Err(StoreError::Conflict(format!(
                "model_name '{}' is a registered model; pick a new name",
                spec["model_name"].as_str().unwrap_or_default()
            ))),
            Err(StoreError::Postgres(e)) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                // The id is a fresh UUID: a clash on it is this insert
                // retried after its answer was lost.
                if let Ok(Some(r)) = self.get(id) {
                    return Ok(r);
                }
                Err(StoreError::Conflict(format!(
                    "model_name '{}' is held by another queued or running job",
                    spec["model_name"].as_str().unwrap_or_default()
                )))
            }
            Err(e) => Err(e),
        }
    }

    fn get(&self, id: &str) -> StoreResult<Option<JobRecord>> {
        let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = $1");
        let row = self.with(|c| {
            let (sql, id) = (sql.clone(), id.to_owned());
            Box::pin(async move { c.query_opt(&sql, &[&id]).await })
        })?;
        Ok(row.as_ref().map(record))
    }

    fn list(&self) -> StoreResult<Vec<JobRecord>> {
        let sql = format!("SELECT {COLUMNS} FROM jobs ORDER BY created_at DESC, id");
        let rows = self.with(|c| {
            let sql = sql.clone();
            Box::pin(async move { c.query(&sql, &[]).await })
        })?;
        Ok(rows.iter().map(record).collect())
    }

    fn claim_next(&self) -> StoreResult<Option<JobRecord>> {
        let (lease, max) = (self.lease_secs(), self.opts.max_attempts as i32);
        let started = now();
        let claim = format!(
            "UPDATE jobs SET status = 'running', worker = $1, lease_expires = now() + make_interval(secs => $2), \
             attempts = attempts + 1, started_at = $3 \
             WHERE id = (SELECT id FROM jobs WHERE status = 'queued' OR (status = 'running' AND lease_expires < now()) \
                         ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED) \
             RETURNING {COLUMNS}"
        );
        let row = self.with(|c| {
            let (claim, me) = (claim.clone(), self.opts.instance.clone());
            Box::pin(async move {
                // A job whose workers died `max` times is not tried again.
                c.execute(
                    "UPDATE jobs SET status = 'failed', finished_at = $1, worker = NULL, lease_expires = NULL, \
                     error = 'its worker stopped answering on each of its ' || attempts || ' starts (the lease expired); not retried past --max-attempts' \
                     WHERE status = 'running' AND lease_expires < now() AND attempts >= $2",
                    &[&started, &max],
                )
                .await?;
                c.query_opt(&claim, &[&me, &lease, &started]).await
            })
        })?;
        Ok(row.as_ref().map(record))
    }

    fn progress(&self, id: &str, progress: &Progress) -> StoreResult<()> {
        let p = serde_json::to_value(progress).expect("progress serialises");
        let (fraction, loss) = (progress.fraction, progress.loss);
        self.with(|c| {
            let (p, id, me) = (p.clone(), id.to_owned(), self.opts.instance.clone());
            Box::pin(async move {
                c.execute(
                    "UPDATE jobs SET progress = $2, curve = curve || jsonb_build_array(jsonb_build_array($3::float8, $4::float8)) \
                     WHERE id = $1 AND worker = $5",
                    &[&id, &p, &fraction, &loss, &me],
                )
                .await
            })
        })?;
        Ok(())
    }

    fn history(&self, id: &str, history: &[EpochRecord]) -> StoreResult<()> {
        let h = serde_json::to_value(history).expect("history serialises");
        self.with(|c| {
            let (h, id, me) = (h.clone(), id.to_owned(), self.opts.instance.clone());
            Box::pin(async move {
                c.execute(
                    "UPDATE jobs SET history = $2 WHERE id = $1 AND worker = $3",
                    &[&id, &h, &me],
                )
                .await
            })
        })?;
        Ok(())
    }

    fn finish(
        &self,
        id: &str,
        status: Status,
        model: Option<&str>,
        error: Option<&str>,
    ) -> StoreResult<()> {
        let (state, finished) = (status.as_str(), now());
        self.with(|c| {
            let (id, me) = (id.to_owned(), self.opts.instance.clone());
            let (model, error) = (model.map(str::to_owned), error.map(str::to_owned));
            Box::pin(async move {
                c.execute(
                    "UPDATE jobs SET status = $2, model = $3, error = $4, finished_at = $5, worker = NULL, lease_expires = NULL \
                     WHERE id = $1 AND status = 'running' AND worker = $6",
                    &[&id, &state, &model, &error, &finished, &me],
                )
                .await
            })
        })?;
        Ok(())
    }

    fn cancel(&self, id: &str) -> StoreResult<CancelOutcome> {
        let at = now();
        self.with(|c| {
            let id = id.to_owned();
            Box::pin(async move {
                let tx = c.transaction().await?;
                let status: Option<String> = tx
                    .query_opt("SELECT status FROM jobs WHERE id = $1 FOR UPDATE", &[&id])
                    .await?
                    .map(|r| r.get(0));
                let outcome = match status.as_deref().map(Status::parse) {
                    None => CancelOutcome::NotFound,
                    Some(Status::Queued) => {
                        tx.execute(
                            "UPDATE jobs SET status = 'cancelled', cancel_requested = true, finished_at = $2 WHERE id = $1",
                            &[&id, &at],
                        )
                        .await?;
                        CancelOutcome::Cancelled
                    }
                    Some(Status::Running) => {
                        tx.execute(
                            "UPDATE jobs SET cancel_requested = true WHERE id = $1",
                            &[&id],
                        )
                        .await?;
                        CancelOutcome::Requested
                    }
                    Some(s) => CancelOutcome::AlreadyFinal(s),
                };
                tx.commit().await?;
                Ok(outcome)
            })
        })
    }

    fn cancel_requested(&self, id: &str) -> StoreResult<bool> {
        let row = self.with(|c| {
            let id = id.to_owned();
            Box::pin(async move {
                c.query_opt("SELECT cancel_requested FROM jobs WHERE id = $1", &[&id])
                    .await
            })
        })?;
        Ok(row.is_some_and(|r| r.get(0)))
    }

    fn requeue_interrupted(&self) -> StoreResult<Vec<String>> {
        // Other processes' running jobs are theirs: a dead worker's jobs
        // come back when their leases expire, not when some process starts.
        Ok(Vec::new())
    }

    fn counts(&self) -> StoreResult<Vec<(Status, u64)>> {
        let rows = self.with(|c| {
            Box::pin(async move {
                c.query("SELECT status, COUNT(*) FROM jobs GROUP BY status", &[])
                    .await
            })
        })?;
        Ok(Status::ALL
            .iter()
            .map(|s| {
                let n = rows
                    .iter()
                    .find(|r| r.get::<_, &str>(0) == s.as_str())
                    .map_or(0, |r| r.get::<_, i64>(1).max(0) as u64);
                (*s, n)
            })
            .collect())
    }

    fn active(&self) -> StoreResult<Vec<(String, String)>> {
        let rows = self.with(|c| {
            Box::pin(async move {
                c.query(
                    "SELECT id, COALESCE(spec->>'model_name', '') FROM jobs WHERE status IN ('queued', 'running')",
                    &[],
                )
                .await
            })
        })?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    fn shared(&self) -> bool {
        true
    }

    fn lease(&self) -> Option<Duration> {
        Some(self.opts.lease)
    }

    fn still_mine(&self, id: &str) -> StoreResult<bool> {
        let row = self.with(|c| {
            let (id, me) = (id.to_owned(), self.opts.instance.clone());
            Box::pin(async move {
                c.query_opt(
                    "SELECT 1 FROM jobs WHERE id = $1 AND worker = $2 AND status = 'running' AND lease_expires > now()",
                    &[&id, &me],
                )
                .await
            })
        })?;
        Ok(row.is_some())
    }

    fn heartbeat(&self) -> StoreResult<Option<Vec<Lease>>> {
        let lease = self.lease_secs();
        // A quarter of the lease at most, so a worker cut off from the
        // database learns it (and stops its jobs) well before the lease ends.
        let patience = (self.opts.lease / 4).clamp(Duration::from_millis(500), QUERY_TIMEOUT);
        let rows = self.with_on(&self.client, patience, |c| {
            let me = self.opts.instance.clone();
            Box::pin(async move {
                c.query(
                    "UPDATE jobs SET lease_expires = now() + make_interval(secs => $2) \
                     WHERE worker = $1 AND status = 'running' RETURNING id, cancel_requested",
                    &[&me, &lease],
                )
                .await
            })
        })?;
        Ok(Some(
            rows.iter()
                .map(|r| Lease {
                    id: r.get(0),
                    cancel_requested: r.get(1),
                })
                .collect(),
        ))
    }

    fn release_lease(&self, id: &str) -> StoreResult<()> {
        self.with(|c| {
            let (id, me) = (id.to_owned(), self.opts.instance.clone());
            Box::pin(async move {
                c.execute(
                    "UPDATE jobs SET status = 'queued', worker = NULL, lease_expires = NULL \
                     WHERE id = $1 AND worker = $2 AND status = 'running'",
                    &[&id, &me],
                )
                .await
            })
        })?;
        Ok(())
    }

    fn listen(&self, tx: mpsc::Sender<Notice>) {
        let config = self.config.clone();
        let me = self.opts.instance.clone();
        self.rt().spawn(async move {
            loop {
                if let Ok((client, mut connection)) = config.connect(NoTls).await {
                    let (heard, mut hear) = tokio::sync::mpsc::unbounded_channel::<String>();
                    // The connection yields notifications only while polled.
                    let driver = tokio::spawn(async move {
                        while let Some(message) =
                            std::future::poll_fn(|cx| connection.poll_message(cx)).await
                        {
                            match message {
                                Ok(AsyncMessage::Notification(n)) => {
                                    if heard.send(n.payload().to_string()).is_err() {
                                        break;
                                    }
                                }
                                Ok(_) => {}
                                Err(_) => break,
                            }
                        }
                    });
                    if client.batch_execute("LISTEN convscope_jobs").await.is_ok() {
                        // Whatever happened while not listening is unknown.
                        if tx.send(Notice::Resync).is_err() {
                            driver.abort();
                            return;
                        }
                        while let Some(payload) = hear.recv().await {
                            let Some(notice) = parse_notice(&payload, &me) else {
                                continue;
                            };
                            if tx.send(notice).is_err() {
                                driver.abort();
                                return;
                            }
                        }
                    }
                    driver.abort();
                    tracing::warn!("job store notifications interrupted; reconnecting");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
}

/// `"<kind> <id> <sender>"`; `None` for one this process sent itself.
fn parse_notice(payload: &str, me: &str) -> Option<Notice> {
    let mut parts = payload.splitn(3, ' ');
    let kind = match parts.next()? {
        "state" => "state",
        "epoch" => "epoch",
        "progress" => "progress",
        "cancel" => "cancel",
        "models" => "models",
        _ => return None,
    };
    let id = parts.next()?.to_string();
    if parts.next() == Some(me) {
        return None;
    }
    Some(Notice::Job { kind, id })
}

/// Wakes the thread waiting in [`block_on`].
struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Polls `fut` on this thread until it is ready or `timeout` passes
/// (`None`). A client's query futures only exchange messages with the
/// connection task on the store's runtime, so they need no runtime here,
/// and this works from any thread, an async handler's included.
fn block_on<F: Future>(fut: F, timeout: Duration) -> Option<F::Output> {
    let deadline = Instant::now() + timeout;
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = TaskContext::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return Some(v);
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        std::thread::park_timeout(left);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_from_this_process_are_skipped_and_others_parsed() {
        assert_eq!(
            parse_notice("epoch 1234 worker-b", "worker-a"),
            Some(Notice::Job {
                kind: "epoch",
                id: "1234".into()
            })
        );
        assert_eq!(parse_notice("epoch 1234 worker-a", "worker-a"), None);
        assert_eq!(parse_notice("rename 1234 worker-b", "worker-a"), None);
    }

    #[test]
    fn block_on_gives_up_at_its_timeout() {
        let never = std::future::pending::<()>();
        let started = Instant::now();
        assert_eq!(block_on(never, Duration::from_millis(50)), None);
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(block_on(async { 7 }, Duration::from_millis(50)), Some(7));
    }
}
