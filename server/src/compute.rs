//! The bounded compute pool: model work runs on the rayon pool, never on
//! the async executor, with a fixed number running at once and a bounded
//! number waiting. Beyond that the server answers 503 with `Retry-After`
//! instead of piling up memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::error::{ApiError, ApiResult};

tokio::task_local! {
    /// Seconds of compute a request has used so far: set up by the metrics
    /// middleware around each request, added to by [`Compute::run`], so the
    /// per-model compute histogram needs no change to the handlers.
    pub static COMPUTE_SECONDS: std::cell::Cell<f64>;
}

/// Cheap to clone; shared by all handlers.
#[derive(Clone)]
pub struct Compute {
    slots: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    timeout: Duration,
    total_slots: usize,
}

impl Compute {
    /// `slots` computations at once, `max_waiting` more queued, each
    /// request answered within `timeout` (waiting included).
    pub fn new(slots: usize, max_waiting: usize, timeout: Duration) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(slots.max(1))),
            waiting: Arc::new(AtomicUsize::new(0)),
            max_waiting,
            timeout,
            total_slots: slots.max(1),
        }
    }

    /// Computations waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Computations holding a slot.
    pub fn running(&self) -> usize {
        self.total_slots - self.slots.available_permits()
    }

    /// Runs `f` on a blocking thread once a slot is free. If the client
    /// goes away while waiting, the future is dropped and the work never
    /// starts. Past the timeout the client gets a 504; a computation already
    /// running finishes in the background and keeps its slot until then, so
    /// the pool never runs more than its slots.
    pub async fn run<T, F>(&self, f: F) -> ApiResult<T>
    where
        F: FnOnce() -> ApiResult<T> + Send + 'static,
        T: Send + 'static,
    {
        match tokio::time::timeout(self.timeout, self.run_untimed(f)).await {
            Ok(result) => result,
            Err(_) => Err(ApiError::Timeout(format!(
                "the computation did not finish within {} s (--request-timeout-secs); try a smaller request",
                self.timeout.as_secs_f64()
            ))),
        }
    }

    async fn run_untimed<T, F>(&self, f: F) -> ApiResult<T>
    where
        F: FnOnce() -> ApiResult<T> + Send + 'static,
        T: Send + 'static,
    {
        let queued = self.waiting.fetch_add(1, Ordering::SeqCst);
        let guard = WaitGuard(&self.waiting);
        if queued >= self.max_waiting {
            return Err(ApiError::Busy(format!(
                "the compute queue is full ({} requests waiting); retry shortly",
                self.max_waiting
            )));
        }
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::Internal("compute pool closed".into()))?;
        drop(guard);
        // The work runs on a thread of the rayon pool the kernels use, so
        // their parallel loops start on a warm worker instead of handing
        // every one over from an outside thread (a ResNet-20 forward is
        // ~60 of them).
        let (tx, rx) = tokio::sync::oneshot::channel();
        rayon::spawn(move || {
            let _permit = permit;
            let started = std::time::Instant::now();
            // A panic must not take the pool (or the process) down.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send((result, started.elapsed().as_secs_f64()));
        });
        let (result, seconds) = rx
            .await
            .map_err(|_| ApiError::Internal("compute task vanished".into()))?;
        let result = result.map_err(|panic| {
            let what = crate::catch_panic::panic_message(panic.as_ref());
            ApiError::Internal(format!("compute task panicked: {what}"))
        });
        let result = result.and_then(|r| r);
        // Outside a request (tests, start-up) there is no scope: nothing to add to.
        let _ = COMPUTE_SECONDS.try_with(|total| total.set(total.get() + seconds));
        result
    }
}

struct WaitGuard<'a>(&'a AtomicUsize);

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
