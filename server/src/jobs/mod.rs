//! Training jobs: the durable queue ([`store`]), the workers that run them,
//! and the live events `GET /jobs/{id}/events` streams.
//!
//! Workers are plain threads, each training inside its own rayon pool of
//! `--train-threads` threads, apart from the HTTP runtime and the compute
//! pool that answers inspection requests, so inference stays responsive
//! while a job trains.
//!
//! A job's life: `queued` (row inserted) → `running` (claimed atomically) →
//! `succeeded` (model registered, then the row) | `failed` | `cancelled`.
//! After every epoch the worker leaves resumable state in
//! `<models>/.jobs/<id>/`; if the process dies, the next start puts
//! `running` jobs back in the queue and they resume from their last epoch.
//!
//! With a shared store (PostgreSQL: API replicas and `convscope worker`s
//! over one shared models directory) three more threads run: a heartbeat
//! renews this process's leases every second and stops a job whose lease
//! was lost (another worker has it now; nothing is written or removed); a
//! listener turns other processes' changes into the same events, holds and
//! releases names for their jobs, wakes idle workers and loads or drops the
//! models they registered or deleted; and both also poll, since
//! notifications sent while a connection is down are lost.

pub mod postgres;
pub mod store;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use candle_core::Device;
use model_store::train::{self, Control, EpochRecord, Event, JobSpec, Outcome, Progress};
use model_store::{ModelStore, Owner};
use serde::Serialize;
use tokio::sync::broadcast;
use utoipa::ToSchema;

use store::{JobRecord, JobStore, Notice, Status};

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobView {
    /// Its id.
    pub job_id: String,
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    pub status: Status,
    /// The model it trains.
    pub model_name: String,
    /// The dataset.
    pub dataset: String,
    /// Where it is (null before it starts).
    pub progress: Option<Progress>,
    /// One line per completed epoch.
    pub history: Vec<EpochRecord>,
    /// The registered model, once it succeeded.
    pub model: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// Unix seconds.
    pub created_at: f64,
    /// When a worker (last) started it.
    pub started_at: Option<f64>,
    /// When it ended.
    pub finished_at: Option<f64>,
    /// Starts, counting resumes after a crash.
    pub attempts: u32,
    /// The worker running it (with `--jobs postgres://`; null otherwise
    /// and when it is not running).
    pub worker: Option<String>,
    /// A cancel was asked for.
    pub cancel_requested: bool,
    /// The job body.
    #[schema(value_type = Object)]
    pub spec: serde_json::Value,
}

impl From<&JobRecord> for JobView {
    fn from(r: &JobRecord) -> Self {
        let field = |k: &str| r.spec[k].as_str().unwrap_or_default().to_string();
        JobView {
            job_id: r.id.clone(),
            status: r.status,
            model_name: field("model_name"),
            dataset: field("dataset"),
            progress: r.progress.clone(),
            history: r.history.clone(),
            model: r.model.clone(),
            error: r.error.clone(),
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            attempts: r.attempts,
            worker: r.worker.clone(),
            cancel_requested: r.cancel_requested,
            spec: r.spec.clone(),
        }
    }
}

/// What SSE subscribers hear.
#[derive(Debug, Clone)]
pub struct JobEvent {
    /// `progress`, `epoch` or `state`.
    pub kind: &'static str,
    /// The job after the event.
    pub job: JobView,
}

/// Where jobs read and write models and datasets.
#[derive(Clone)]
pub struct Context {
    /// The model store: sources, and where results are registered under
    /// the names the jobs hold.
    pub models: Arc<ModelStore>,
    /// The datasets directory.
    pub datasets: PathBuf,
    /// Where training runs.
    pub device: Device,
    /// Object storage (`--models s3://...`): each epoch's resume state
    /// goes there, so a worker on another machine can resume the job.
    pub storage: Option<Arc<crate::storage::SharedStorage>>,
}

/// The job service: store, wake-ups, cancellation flags, event channels.
pub struct Jobs {
    /// The durable queue.
    pub store: Arc<dyn JobStore>,
    ctx: Context,
    wake: (Mutex<bool>, Condvar),
    shutdown: AtomicBool,
    /// Stop after the current epoch and claim nothing more (SIGTERM to a
    /// worker, `--max-jobs` reached).
    draining: AtomicBool,
    cancels: Mutex<HashMap<String, Arc<AtomicBool>>>,
    /// Running jobs whose lease another worker took.
    lost: Mutex<HashSet<String>>,
    /// Jobs claimed by this process and not yet concluded.
    mine: Mutex<HashSet<String>>,
    /// When a heartbeat last renewed this process's leases.
    renewed: Mutex<std::time::Instant>,
    /// Leases the last heartbeat found without a job here.
    suspects: Mutex<HashSet<String>>,
    channels: Mutex<HashMap<String, broadcast::Sender<JobEvent>>>,
    /// What each channel last heard, so polling sends only changes.
    sent: Mutex<HashMap<String, String>>,
    /// Claims left before this process stops claiming (`--max-jobs`).
    claims_left: Mutex<Option<usize>>,
    /// Worker threads still looping.
    looping: AtomicUsize,
}

/// How often the shared-store threads renew leases and poll.
const TICK: Duration = Duration::from_secs(1);

impl Jobs {
    /// The service over `store`; interrupted jobs go back to the queue, and
    /// every queued job holds its model name again.
    pub fn new(store: Arc<dyn JobStore>, ctx: Context) -> Result<Arc<Self>, store::StoreError> {
        let requeued = store.requeue_interrupted()?;
        for id in &requeued {
            tracing::warn!(job = %id, "job was running when the server stopped; queued to resume");
        }
        for (id, name) in store.active()? {
            ctx.models.restore_reservation(&name, &id);
        }
        let jobs = Arc::new(Self {
            store,
            ctx,
            wake: (Mutex::new(false), Condvar::new()),
            shutdown: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            cancels: Mutex::new(HashMap::new()),
            lost: Mutex::new(HashSet::new()),
            mine: Mutex::new(HashSet::new()),
            renewed: Mutex::new(std::time::Instant::now()),
            suspects: Mutex::new(HashSet::new()),
            channels: Mutex::new(HashMap::new()),
            sent: Mutex::new(HashMap::new()),
            claims_left: Mutex::new(None),
            looping: AtomicUsize::new(0),
        });
        if jobs.store.shared() {
            jobs.start_shared_threads();
        }
        Ok(jobs)
    }

    /// The heartbeat and the listener of a shared store; they hold the
    /// service weakly and end with it.
    fn start_shared_threads(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("job-leases".into())
            .spawn(move || {
                while let Some(jobs) = Weak::upgrade(&weak) {
                    jobs.renew_leases();
                    drop(jobs);
                    std::thread::sleep(TICK);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the lease heartbeat");
        }
        let (tx, rx) = std::sync::mpsc::channel();
        self.store.listen(tx);
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("job-notices".into())
            .spawn(move || {
                let mut synced = std::time::Instant::now();
                loop {
                    let heard = rx.recv_timeout(TICK);
                    let Some(jobs) = Weak::upgrade(&weak) else {
                        return;
                    };
                    let resync = matches!(heard, Ok(Notice::Resync));
                    match heard {
                        Ok(Notice::Job { kind, id }) => jobs.heard(kind, &id),
                        Ok(Notice::Resync) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                            std::thread::sleep(TICK);
                        }
                    }
                    // Every second however busy the notices are (a training
                    // job sends several a second).
                    if resync || synced.elapsed() >= TICK {
                        jobs.resync();
                        synced = std::time::Instant::now();
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the job listener");
        }
    }

    /// Renews this process's leases; a running job missing from the answer
    /// was lost, one asked to stop is stopped.
    fn renew_leases(&self) {
        let leases = match self.store.heartbeat() {
            Ok(Some(leases)) => {
                *self.renewed.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
                leases
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the job leases; retrying");
                // Unrenewed for half the lease (a heartbeat gives up after a
                // quarter): another worker may take the jobs soon, so they
                // stop here first.
                let since = self
                    .renewed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .elapsed();
                if let Some(lease) = self.store.lease()
                    && since > lease / 2
                {
                    self.lose_all();
                }
                return;
            }
        };
        // Rows this process holds but never started (a claim whose answer
        // was lost on the way), seen so at two heartbeats in a row (a claim
        // in the instant before it is noted is not one): back to the queue.
        let mine = self.mine.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut suspects = self.suspects.lock().unwrap_or_else(|e| e.into_inner());
        let orphans: HashSet<String> = leases
            .iter()
            .filter(|l| !mine.contains(&l.id))
            .map(|l| l.id.clone())
            .collect();
        for id in orphans.intersection(&suspects) {
            tracing::warn!(job = %id, "a claim this process never saw; giving the job back");
            let _ = self.store.release_lease(id);
        }
        *suspects = orphans;
        drop(suspects);
        let cancels = self.cancels.lock().unwrap_or_else(|e| e.into_inner());
        for (id, flag) in cancels.iter() {
            match leases.iter().find(|l| &l.id == id) {
                Some(lease) if lease.cancel_requested => flag.store(true, Ordering::SeqCst),
                Some(_) => {}
                None => {
                    tracing::warn!(job = %id, "lost the job's lease (another worker has it); stopping it here without writing");
                    self.lost
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(id.clone());
                    flag.store(true, Ordering::SeqCst);
                }
            }
        }
    }

    /// Stops every running job here as lost (its lease cannot be renewed).
    fn lose_all(&self) {
        let cancels = self.cancels.lock().unwrap_or_else(|e| e.into_inner());
        let mut lost = self.lost.lock().unwrap_or_else(|e| e.into_inner());
        for (id, flag) in cancels.iter() {
            if lost.insert(id.clone()) {
                tracing::warn!(job = %id, "the job's lease could not be renewed; stopping it here without writing");
            }
            flag.store(true, Ordering::SeqCst);
        }
    }

    /// Another process changed job `id`.
    fn heard(&self, kind: &'static str, id: &str) {
        match kind {
            "models" => {
                self.ctx.models.refresh();
                return;
            }
            "cancel" => self.cancel_running(id),
            "state" => {
                if let Ok(Some(job)) = self.store.get(id) {
                    self.hold_or_release(&job);
                    if job.status == Status::Queued {
                        self.notify();
                    }
                    if job.status.is_final() {
                        self.ctx.models.refresh();
                    }
                }
            }
            _ => {}
        }
        if kind != "cancel" {
            self.publish(id, kind);
        }
    }

    /// A job's name is held here while it is queued or running anywhere,
    /// and free once it has ended (unless this process runs it).
    fn hold_or_release(&self, job: &JobRecord) {
        let running_here = self
            .cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&job.id);
        if running_here {
            return;
        }
        if job.status.is_final() {
            self.ctx.models.release(&job.id);
        } else if let Some(name) = job.spec["model_name"].as_str() {
            self.ctx.models.restore_reservation(name, &job.id);
        }
    }

    /// Everything again: names held by active jobs anywhere, models on
    /// disk, and the current state to every stream (notices may be lost).
    fn resync(&self) {
        let Ok(active) = self.store.active() else {
            return;
        };
        let running_here: HashSet<String> = self
            .cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        for (job, name) in self.ctx.models.job_holds() {
            let still = active.iter().any(|(id, _)| *id == job);
            if still || running_here.contains(&job) {
                continue;
            }
            // Only a job recorded as ended frees its name: one not found
            // may be a submission between its hold and its row.
            if let Ok(Some(r)) = self.store.get(&job)
                && r.status.is_final()
            {
                tracing::debug!(job = %job, model = %name, "the job ended elsewhere; its name is free");
                self.ctx.models.release(&job);
            }
        }
        for (id, name) in &active {
            if self.ctx.models.holder(name).is_none() {
                self.ctx.models.restore_reservation(name, id);
            }
        }
        if active.iter().any(|(id, _)| !running_here.contains(id)) {
            self.notify();
        }
        self.ctx.models.refresh();
        let subscribed: Vec<String> = self
            .channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        for id in subscribed {
            self.publish_if_changed(&id);
        }
    }

    /// The context jobs run in.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// Starts `workers` worker threads, each training with `threads` threads
    /// (none: this server queues and answers, other processes train).
    pub fn start_workers(self: &Arc<Self>, workers: usize, threads: usize) {
        for n in 0..workers {
            let jobs = self.clone();
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads.max(1))
                .thread_name(move |i| format!("train-{n}-{i}"))
                .build();
            let pool = match pool {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start a training pool");
                    return;
                }
            };
            // Counted before the thread runs, so `workers_done` cannot be
            // true before any worker started.
            self.looping.fetch_add(1, Ordering::SeqCst);
            let spawned = std::thread::Builder::new()
                .name(format!("job-worker-{n}"))
                .spawn(move || jobs.worker_loop(&pool));
            if let Err(e) = spawned {
                self.looping.fetch_sub(1, Ordering::SeqCst);
                tracing::error!(error = %e, "cannot start a job worker");
            }
        }
    }

    /// Wakes a worker (a job was queued).
    pub fn notify(&self) {
        let (lock, cv) = &self.wake;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }

    /// Stops the workers: a running job is left `running` with its last
    /// epoch on disk, and resumes at the next start.
    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        self.notify();
    }

    /// Cancels a queued job at once (its name is free again), or asks a
    /// running one to stop after its current batch.
    pub fn cancel(&self, id: &str) -> Result<store::CancelOutcome, store::StoreError> {
        let outcome = self.store.cancel(id)?;
        match outcome {
            store::CancelOutcome::Cancelled => {
                // A queued job given back by a draining worker has state.
                if let Some(st) = &self.ctx.storage {
                    st.drop_work(id);
                }
                self.ctx.models.release(id);
                self.publish(id, "state");
            }
            store::CancelOutcome::Requested => self.cancel_running(id),
            store::CancelOutcome::AlreadyFinal(_) | store::CancelOutcome::NotFound => {}
        }
        Ok(outcome)
    }

    /// Runs `change` (a registration, a deletion, a reservation); when it is
    /// refused because a job holds the name but that job has ended (it ran
    /// in another process, which released the name there), the stale hold
    /// is dropped and `change` runs once more.
    pub fn unless_stale<T>(
        &self,
        change: impl Fn() -> model_store::Result<T>,
    ) -> model_store::Result<T> {
        match change() {
            Err(model_store::Error::NameHeld {
                owner: Owner::Job(job),
                ..
            }) if self
                .store
                .get(&job)
                .is_ok_and(|r| r.is_none_or(|r| r.status.is_final())) =>
            {
                self.ctx.models.release(&job);
                change()
            }
            other => other,
        }
    }

    /// Asks a running job to stop after its current batch.
    fn cancel_running(&self, id: &str) {
        if let Some(flag) = self
            .cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
        {
            flag.store(true, Ordering::SeqCst);
        }
    }

    /// The event channel of a job (made on first use).
    pub fn subscribe(&self, id: &str) -> broadcast::Receiver<JobEvent> {
        self.channel(id).subscribe()
    }

    fn channel(&self, id: &str) -> broadcast::Sender<JobEvent> {
        self.channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_string())
            .or_insert_with(|| broadcast::channel(256).0)
            .clone()
    }

    /// Tells subscribers; the final state also closes the channel.
    pub fn publish(&self, id: &str, kind: &'static str) {
        let Ok(Some(record)) = self.store.get(id) else {
            return;
        };
        self.send(&record, kind);
    }

    fn send(&self, record: &JobRecord, kind: &'static str) {
        let id = record.id.as_str();
        let job = JobView::from(record);
        let _ = self.channel(id).send(JobEvent { kind, job });
        let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        if record.status.is_final() {
            sent.remove(id);
            self.channels
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
        } else {
            sent.insert(id.to_string(), fingerprint(record));
        }
    }

    /// Publishes job `id` if it changed since its channel last heard.
    fn publish_if_changed(&self, id: &str) {
        let Ok(Some(record)) = self.store.get(id) else {
            return;
        };
        let last = self
            .sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned();
        if last.as_deref() != Some(fingerprint(&record).as_str()) {
            let kind = match &last {
                Some(l) if l.starts_with(record.status.as_str()) => "progress",
                _ => "state",
            };
            self.send(&record, kind);
        }
    }

    /// Stops claiming; a running job stops after its current epoch and is
    /// given back to the queue (SIGTERM to a worker).
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.notify();
    }

    /// Claims `n` jobs at most, then drains (`--max-jobs`).
    pub fn limit_claims(&self, n: usize) {
        *self.claims_left.lock().unwrap_or_else(|e| e.into_inner()) = Some(n);
    }

    /// Every worker thread has stopped (drained, or its claims used up).
    pub fn workers_done(&self) -> bool {
        self.looping.load(Ordering::SeqCst) == 0
    }

    /// Takes one claim of `--max-jobs`; false when none is left.
    fn take_claim(&self) -> bool {
        let mut left = self.claims_left.lock().unwrap_or_else(|e| e.into_inner());
        match left.as_mut() {
            None => true,
            Some(0) => false,
            Some(n) => {
                *n -= 1;
                true
            }
        }
    }

    fn worker_loop(&self, pool: &rayon::ThreadPool) {
        self.work(pool);
        self.looping.fetch_sub(1, Ordering::SeqCst);
    }

    fn work(&self, pool: &rayon::ThreadPool) {
        while !self.shutdown.load(Ordering::SeqCst) && !self.draining.load(Ordering::SeqCst) {
            let may_claim = self
                .claims_left
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_none_or(|n| n > 0);
            if !may_claim {
                return;
            }
            match self.store.claim_next() {
                Ok(Some(job)) => {
                    let id = job.id.clone();
                    self.mine
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(id.clone());
                    if !self.take_claim() {
                        // Another thread of this process used the last one.
                        let _ = self.store.release_lease(&id);
                        self.mine
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&id);
                        return;
                    }
                    self.publish(&id, "state");
                    // A panic in training must not leave the job `running`
                    // and its name held, nor end this worker.
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        pool.install(|| self.run_job(job))
                    }));
                    self.mine
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&id);
                    if let Err(panic) = ran {
                        let what = crate::catch_panic::panic_message(panic.as_ref());
                        tracing::error!(job = %id, panic = %what, "training panicked");
                        self.cancels
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&id);
                        self.finish(
                            &id,
                            Status::Failed,
                            None,
                            Some(&format!("training stopped on an internal error: {what}")),
                        );
                    }
                }
                Ok(None) => {
                    let (lock, cv) = &self.wake;
                    let mut woken = lock.lock().unwrap_or_else(|e| e.into_inner());
                    if !*woken {
                        woken = cv
                            .wait_timeout(woken, Duration::from_millis(500))
                            .map(|(g, _)| g)
                            .unwrap_or_else(|e| e.into_inner().0);
                    }
                    *woken = false;
                }
                Err(e) => {
                    tracing::error!(error = %e, "job store failed; retrying");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    fn snapshot_name(model: &str, epoch: usize) -> String {
        format!("{model}@epoch-{epoch}")
    }

    /// Ends a job: its row, then its hold on the model name, then the
    /// subscribers. The row goes first so that a crash in between leaves a
    /// final job (whose name is free at the next start), never a free name
    /// with a job still to register it.
    pub fn finish(&self, id: &str, status: Status, model: Option<&str>, error: Option<&str>) {
        match self.store.finish(id, status, model, error) {
            // Its resume state in object storage goes once its row says it
            // ended (a crash before that leaves a job to resume).
            Ok(()) => {
                if let Some(st) = &self.ctx.storage {
                    st.drop_work(id);
                }
            }
            Err(e) => tracing::error!(job = %id, error = %e, "cannot record the end of a job"),
        }
        self.ctx.models.release(id);
        self.publish(id, "state");
    }

    /// Registers `weights` under `manifest`'s name, which the job holds:
    /// validated by loading, written as one commit, then served.
    fn register(
        &self,
        id: &str,
        manifest: &model_store::Manifest,
        weights: &[u8],
    ) -> model_store::Result<()> {
        self.ctx.models.replace(id, manifest, weights).map(|_| ())
    }

    fn run_job(&self, job: JobRecord) {
        let id = job.id.clone();
        let fail = |msg: String| {
            tracing::warn!(job = %id, error = %msg, "job failed");
            self.finish(&id, Status::Failed, None, Some(&msg));
        };
        let spec: JobSpec = match train::parse(&job.spec) {
            Ok(s) => s,
            Err(p) => return fail(p.join("; ")),
        };
        let work = self.ctx.models.path().join(".jobs").join(&id);
        // A crash between registering the model and recording success: the
        // model is there, so the job succeeded.
        if job.attempts > 1 && self.ctx.models.is_committed(&spec.model_name) && !work.exists() {
            self.finish(&id, Status::Succeeded, Some(&spec.model_name), None);
            return;
        }
        // The job holds its name from POST /jobs on; a process that did not
        // see that POST (it started later, or another process queued the
        // job) takes the hold now, or fails the job if the name is taken.
        // With a shared store the database settled the name when the job
        // was queued (one active job per name): this worker holds it.
        let holds = self.ctx.models.holder(&spec.model_name) == Some(Owner::Job(id.clone()));
        if self.store.shared() {
            self.ctx.models.restore_reservation(&spec.model_name, &id);
        } else if !holds && let Err(e) = self.ctx.models.reserve(&spec.model_name, &id) {
            return fail(format!("model_name: {e}"));
        }
        // Another worker's last epoch, from object storage.
        if let Some(st) = &self.ctx.storage
            && let Err(e) = st.load_work(&id, job.resume_epoch, &work)
        {
            tracing::warn!(job = %id, error = %e, "cannot fetch the job's resume state; giving it back");
            let _ = self.store.release_lease(&id);
            std::thread::sleep(Duration::from_secs(1));
            return;
        }
        let env = train::Env {
            models: &self.ctx.models,
            datasets_dir: &self.ctx.datasets,
            device: &self.ctx.device,
        };
        let plan = match train::plan(&spec, &env) {
            Ok(p) => p,
            Err(problems) => return fail(problems.join("; ")),
        };
        tracing::info!(job = %id, model = %spec.model_name, dataset = %spec.dataset, attempt = job.attempts, "training");
        let manifest = plan.manifest.clone();
        let cancel = Arc::new(AtomicBool::new(job.cancel_requested));
        self.cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), cancel.clone());
        // A cancel that came between the claim and the line above.
        if self.store.cancel_requested(&id).unwrap_or(false) {
            cancel.store(true, Ordering::SeqCst);
        }
        let mut registered: Vec<String> = Vec::new();
        let mut snapshot_error = None;
        let mut on_event = |event: Event| -> Control {
            match event {
                Event::Step(p) => {
                    let _ = self.store.progress(&id, p);
                    self.publish(&id, "progress");
                }
                Event::Epoch(p, history) => {
                    // The resume state first: once the epoch shows in the
                    // history, a worker taking the job over resumes after it.
                    if let Some(st) = &self.ctx.storage
                        && let Err(e) = st.save_work(&id, p.epoch, &work)
                    {
                        tracing::warn!(job = %id, epoch = p.epoch, error = %e, "cannot store the epoch's resume state; another worker would resume from an earlier one");
                    }
                    let _ = self.store.progress(&id, p);
                    let _ = self.store.history(&id, history);
                    if spec.epoch_snapshots {
                        match self.snapshot(&id, &spec, &manifest, &work, p.epoch, history) {
                            Ok(name) => registered.push(name),
                            Err(e) => snapshot_error = Some(e),
                        }
                    }
                    self.publish(&id, "epoch");
                    if self.draining.load(Ordering::SeqCst) {
                        return Control::Stop;
                    }
                }
            }
            if snapshot_error.is_some() {
                Control::Stop
            } else {
                Control::Continue
            }
        };
        let stop = || cancel.load(Ordering::SeqCst) || self.shutdown.load(Ordering::SeqCst);
        let outcome = train::run(&spec, plan, &env, &work, &mut on_event, &stop);
        self.cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        let ended = Ended {
            id: &id,
            spec: &spec,
            work: &work,
            registered: &registered,
            cancelled: cancel.load(Ordering::SeqCst),
        };
        self.conclude(&ended, outcome, snapshot_error);
    }

    /// Registers the epoch's weights as `model_name@epoch-N`; its name.
    fn snapshot(
        &self,
        id: &str,
        spec: &JobSpec,
        manifest: &model_store::Manifest,
        work: &std::path::Path,
        epoch: usize,
        history: &[EpochRecord],
    ) -> model_store::Result<String> {
        let mut m = manifest.clone();
        m.name = Self::snapshot_name(&spec.model_name, epoch);
        m.extra.insert(
            "training".into(),
            serde_json::json!({"job_id": id, "epoch": epoch, "of": spec.epochs, "history": history}),
        );
        let path = train::last_snapshot(work);
        let weights =
            std::fs::read(&path).map_err(|source| model_store::Error::Io { path, source })?;
        self.register(id, &m, &weights)?;
        Ok(m.name)
    }

    /// Records how a job's training ended: its model registered and the job
    /// succeeded, or its snapshots and work directory removed and the job
    /// failed or cancelled, or (shutting down) left to resume.
    fn conclude(
        &self,
        e: &Ended,
        outcome: model_store::Result<Outcome>,
        snapshot_error: Option<model_store::Error>,
    ) {
        let (id, work) = (e.id, e.work);
        if self
            .lost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id)
        {
            // Another worker runs it now, from the same work directory.
            tracing::warn!(job = %id, "stopped a job whose lease was lost; left to its new worker");
            return;
        }
        // The heartbeat may not have noticed yet: asked once more before
        // anything is registered, removed or recorded.
        if !self.store.still_mine(id).unwrap_or(false) {
            tracing::warn!(job = %id, "the job's lease is gone (or cannot be checked); left to the worker that has it");
            return;
        }
        let fail = |msg: String| {
            tracing::warn!(job = %id, error = %msg, "job failed");
            self.finish(id, Status::Failed, None, Some(&msg));
        };
        let cleanup = || {
            for name in e.registered {
                if let Err(err) = self.ctx.models.retract(id, name) {
                    tracing::error!(job = %id, model = %name, error = %err, "cannot remove a snapshot");
                }
            }
            let _ = std::fs::remove_dir_all(work);
        };
        match outcome {
            Ok(Outcome::Finished {
                weights, manifest, ..
            }) => {
                let result = train::safetensors_bytes(&weights)
                    .and_then(|bytes| self.register(id, &manifest, &bytes));
                match result {
                    Ok(()) => {
                        // The work directory goes first, so `succeeded` means
                        // nothing is left behind; a crash in between is
                        // recognised at the next start (model there, no work
                        // directory: succeeded).
                        let _ = std::fs::remove_dir_all(work);
                        tracing::info!(job = %id, model = %e.spec.model_name, "job succeeded");
                        self.finish(id, Status::Succeeded, Some(&e.spec.model_name), None);
                    }
                    Err(err) => {
                        cleanup();
                        fail(format!("could not register the trained model: {err}"));
                    }
                }
            }
            Ok(Outcome::Cancelled) if snapshot_error.is_some() => {
                cleanup();
                fail(format!(
                    "could not register an epoch snapshot: {}",
                    snapshot_error.map(|e| e.to_string()).unwrap_or_default()
                ));
            }
            Ok(Outcome::Cancelled) if !e.cancelled => {
                // Shutting down or draining: its last epoch is on disk. A
                // shared store queues it again for another worker now;
                // SQLite's stays `running` and the next start queues it.
                if let Err(err) = self.store.release_lease(id) {
                    tracing::warn!(job = %id, error = %err, "cannot give the job back; it returns when its lease expires");
                }
                tracing::info!(job = %id, "stopping; the job will resume from its last epoch");
            }
            Ok(Outcome::Cancelled) => {
                cleanup();
                tracing::info!(job = %id, "job cancelled");
                self.finish(id, Status::Cancelled, None, None);
            }
            Err(err) => {
                cleanup();
                fail(err.to_string());
            }
        }
    }
}

/// What a job's channel last heard: its state, epochs and step.
fn fingerprint(r: &JobRecord) -> String {
    let step = r.progress.as_ref().map(|p| (p.epoch, p.step));
    format!(
        "{} {} {:?} {}",
        r.status.as_str(),
        r.history.len(),
        step,
        r.cancel_requested
    )
}

/// A job whose training has returned, and what it left.
struct Ended<'a> {
    id: &'a str,
    spec: &'a JobSpec,
    work: &'a std::path::Path,
    registered: &'a [String],
    cancelled: bool,
}
