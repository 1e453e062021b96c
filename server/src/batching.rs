//! Dynamic batching of `/predict`: concurrent requests for the same model
//! share one forward pass.
//!
//! Each model that is being asked gets a queue and a task. The task takes
//! the first waiting request, then whatever else arrives until the batch
//! holds `--predict-batch` images or `--predict-batch-delay-ms` has passed
//! (by default 0: no waiting, only what queued up while the previous batch
//! ran, so a lone client pays nothing), runs one forward pass in the
//! compute pool and hands each request its rows. A batch is one
//! computation to the pool, so its slots and queue bound batches as they
//! bound everything else. Per-image results do not depend on the batch:
//! every layer computes each image independently.
//!
//! A queue's task ends after a while without requests, and a model that is
//! replaced or deleted gets a new queue (requests carry their model), so
//! nothing is kept for models that are gone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::Tensor;
use model_store::LoadedModel;
use tokio::sync::{mpsc, oneshot};

use crate::compute::{COMPUTE_SECONDS, Compute};
use crate::error::{ApiError, ApiResult};

/// A queue's task stops after this long without a request.
const IDLE: Duration = Duration::from_secs(30);

/// Logits rows of one request, and its share of the seconds its batch computed.
type Reply = ApiResult<(Vec<Vec<f32>>, f64)>;

struct Pending {
    model: Arc<LoadedModel>,
    x: Tensor,
    reply: oneshot::Sender<Reply>,
}

struct Queue {
    id: u64,
    model: std::sync::Weak<LoadedModel>,
    tx: mpsc::UnboundedSender<Pending>,
}

/// The batching queues of all models.
pub struct Batcher {
    compute: Compute,
    max_images: usize,
    delay: Duration,
    queues: Arc<Mutex<HashMap<String, Queue>>>,
    next_id: AtomicU64,
    /// Requests queued or computing across all queues, and their bound.
    pending: Arc<AtomicUsize>,
    max_pending: usize,
}

/// Counts a request as pending until dropped (answered, or its client gone).
struct PendingGuard(Arc<AtomicUsize>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Batcher {
    /// Batches of up to `max_images` (1 turns batching off), waiting at
    /// most `delay` for more requests once one has arrived. At most
    /// `max_waiting` requests (the compute queue's bound) wait beyond a
    /// full batch; more get 503, so a flood cannot pile up decoded images.
    pub fn new(compute: Compute, max_images: usize, delay: Duration, max_waiting: usize) -> Self {
        let max_images = max_images.max(1);
        Self {
            compute,
            max_images,
            delay,
            queues: Arc::default(),
            next_id: AtomicU64::new(0),
            pending: Arc::default(),
            max_pending: max_waiting + max_images,
        }
    }

    /// The logits of the preprocessed batch `x` (`[N, C, H, W]`), computed
    /// together with other requests for `model`.
    pub async fn logits(&self, model: Arc<LoadedModel>, x: Tensor) -> ApiResult<Vec<Vec<f32>>> {
        let images = x.dim(0).map_err(model_store::Error::from)?;
        if self.max_images <= 1 || images >= self.max_images {
            return Ok(alone(&self.compute, model, x).await?.0);
        }
        let _guard = PendingGuard(Arc::clone(&self.pending));
        if self.pending.fetch_add(1, Ordering::SeqCst) >= self.max_pending {
            return Err(ApiError::Busy(format!(
                "{} predictions are queued for a batched pass; retry shortly",
                self.max_pending
            )));
        }
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            model: model.clone(),
            x,
            reply,
        };
        let pending = match self.sender(&model).send(pending) {
            Ok(()) => {
                let (rows, seconds) = answer.await.unwrap_or_else(|_| {
                    Err(ApiError::Internal("the batching task stopped".into()))
                })?;
                // The shared pass ran outside this request: charge its share
                // to the request's compute time (the metrics middleware's).
                let _ = COMPUTE_SECONDS.try_with(|t| t.set(t.get() + seconds));
                return Ok(rows);
            }
            // The queue's task ended between the lookup and the send.
            Err(mpsc::error::SendError(p)) => p,
        };
        Ok(alone(&self.compute, pending.model, pending.x).await?.0)
    }

    /// The queue of `model`, started if there is none (or only one for an
    /// earlier model of the same name).
    fn sender(&self, model: &Arc<LoadedModel>) -> mpsc::UnboundedSender<Pending> {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let name = model.name().to_string();
        if let Some(q) = queues.get(&name)
            && q.model.upgrade().is_some_and(|m| Arc::ptr_eq(&m, model))
            && !q.tx.is_closed()
        {
            return q.tx.clone();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        queues.insert(
            name.clone(),
            Queue {
                id,
                model: Arc::downgrade(model),
                tx: tx.clone(),
            },
        );
        tokio::spawn(run_queue(
            rx,
            self.compute.clone(),
            self.max_images,
            self.delay,
            Arc::clone(&self.queues),
            name,
            id,
        ));
        tx
    }
}

/// One request's own forward pass.
async fn alone(compute: &Compute, model: Arc<LoadedModel>, x: Tensor) -> Reply {
    compute
        .run(move || {
            let started = std::time::Instant::now();
            let rows = model
                .logits(&x)?
                .to_vec2::<f32>()
                .map_err(model_store::Error::from)?;
            Ok((rows, started.elapsed().as_secs_f64()))
        })
        .await
}

async fn run_queue(
    mut rx: mpsc::UnboundedReceiver<Pending>,
    compute: Compute,
    max_images: usize,
    delay: Duration,
    queues: Arc<Mutex<HashMap<String, Queue>>>,
    name: String,
    id: u64,
) {
    loop {
        let first = match tokio::time::timeout(IDLE, rx.recv()).await {
            Ok(Some(p)) => p,
            _ => break,
        };
        let mut count = first.x.dim(0).unwrap_or(1);
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + delay;
        while count < max_images {
            let next = match rx.try_recv() {
                Ok(p) => Some(p),
                Err(_) if delay.is_zero() => None,
                Err(_) => tokio::time::timeout_at(deadline, rx.recv())
                    .await
                    .ok()
                    .flatten(),
            };
            let Some(p) = next else { break };
            // A different model under the same name (replaced meanwhile)
            // cannot share the pass: it runs on its own.
            if !Arc::ptr_eq(&p.model, &batch[0].model) {
                let reply = alone(&compute, p.model, p.x).await;
                let _ = p.reply.send(reply);
                continue;
            }
            count += p.x.dim(0).unwrap_or(1);
            batch.push(p);
        }
        run_batch(&compute, batch).await;
    }
    // Stop taking requests; a sender that raced us sees a closed channel
    // and computes alone.
    rx.close();
    while let Ok(p) = rx.try_recv() {
        let reply = alone(&compute, p.model, p.x).await;
        let _ = p.reply.send(reply);
    }
    let mut queues = queues.lock().unwrap_or_else(|e| e.into_inner());
    if queues.get(&name).is_some_and(|q| q.id == id) {
        queues.remove(&name);
    }
}

/// One forward pass over every request of `batch`; each gets its rows.
async fn run_batch(compute: &Compute, batch: Vec<Pending>) {
    if batch.len() == 1 {
        let p = batch.into_iter().next().expect("one request");
        let reply = alone(compute, p.model, p.x).await;
        let _ = p.reply.send(reply);
        return;
    }
    let model = batch[0].model.clone();
    let inputs: Vec<Tensor> = batch.iter().map(|p| p.x.clone()).collect();
    let sizes: Vec<usize> = inputs.iter().map(|x| x.dim(0).unwrap_or(1)).collect();
    let result = compute
        .run(move || {
            let started = std::time::Instant::now();
            let x = Tensor::cat(&inputs, 0).map_err(model_store::Error::from)?;
            let rows = model
                .logits(&x)?
                .to_vec2::<f32>()
                .map_err(model_store::Error::from)?;
            Ok((rows, started.elapsed().as_secs_f64()))
        })
        .await;
    match result {
        Ok((rows, seconds)) => {
            let total = sizes.iter().sum::<usize>().max(1) as f64;
            let mut rows = rows.into_iter();
            for (p, n) in batch.into_iter().zip(sizes) {
                let mine: Vec<Vec<f32>> = rows.by_ref().take(n).collect();
                let _ = p.reply.send(Ok((mine, seconds * n as f64 / total)));
            }
        }
        Err(e) => {
            for p in batch {
                let _ = p.reply.send(Err(e.clone()));
            }
        }
    }
}
