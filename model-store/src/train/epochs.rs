//! The training loop: epoch by epoch, progress through a callback that can
//! also cancel, and after every epoch a resumable state (weights, optimiser
//! moments, history) written atomically in the job's work directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::data::{self, Batcher, Dataset};
use super::evaluate::evaluate_net;
use super::net::{TrainNet, argmax, cross_entropy};
use super::optim::Optimizer;
use super::plan::{Env, Plan};
use super::spec::JobSpec;
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::rng::Rng;

/// One epoch's line of the log students know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    /// Mean training loss over the epoch.
    pub loss: f64,
    /// Accuracy on the training batches as they were trained.
    pub train_accuracy: f64,
    /// Accuracy on the test split after the epoch.
    pub test_accuracy: f64,
    /// Wall time of the epoch (training and testing).
    pub seconds: f64,
}

/// Where a job is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Progress {
    /// Current epoch, 1-based.
    pub epoch: usize,
    /// Of this many.
    pub epochs: usize,
    /// Step within the epoch.
    pub step: usize,
    /// Steps per epoch.
    pub steps: usize,
    /// Of the whole job, 0-1.
    pub fraction: f64,
    /// Mean loss of the epoch so far.
    pub loss: f64,
}

/// What the loop tells its caller.
pub enum Event<'a> {
    /// Every `progress_every` steps.
    Step(&'a Progress),
    /// After each epoch, once its resumable state is on disk: the
    /// history so far (this epoch last).
    Epoch(&'a Progress, &'a [EpochRecord]),
}

/// The caller's answer: go on or stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Keep training.
    Continue,
    /// Stop at once (cancellation).
    Stop,
}

/// How a run ended.
pub enum Outcome {
    /// Every epoch ran.
    Finished {
        /// The trained weights, `state_dict` names.
        weights: Vec<(String, Tensor)>,
        /// The manifest to register them under.
        manifest: Box<Manifest>,
        /// Per-epoch records.
        history: Vec<EpochRecord>,
    },
    /// The callback said stop.
    Cancelled,
}

/// Resumable state in the job's work directory, written after each epoch.
#[derive(Debug, Serialize, Deserialize)]
struct Resume {
    epoch: usize,
    history: Vec<EpochRecord>,
    batches_tracked: i64,
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn save_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    let tmp = path.with_extension("tmp.safetensors");
    candle_core::safetensors::save(&map, &tmp)?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
}

/// Serialises named tensors as safetensors bytes (for the model store).
pub fn safetensors_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let views: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    safetensors::tensor::serialize(views, None)
        .map_err(|e| Error::Candle(candle_core::Error::Msg(format!("safetensors: {e}"))))
}

/// Runs a planned job. `work` is the job's own directory (resumable state);
/// when it holds a completed epoch, training resumes after it.
/// `should_stop` is asked after every step (cancellation within one batch);
/// `on_event` hears progress every `progress_every` steps and each epoch.
pub fn run(
    spec: &JobSpec,
    plan: Plan,
    env: &Env,
    work: &Path,
    on_event: &mut dyn FnMut(Event) -> Control,
    should_stop: &dyn Fn() -> bool,
) -> Result<Outcome> {
    std::fs::create_dir_all(work).map_err(|source| Error::Io {
        path: work.to_path_buf(),
        source,
    })?;
    let (dataset, batcher) = open_dataset(spec, &plan, env)?;
    let mut net = TrainNet::new(&plan.network, &spec.freeze)?;
    let mut opt = Optimizer::new(&spec.optimizer);
    let state = WorkDir::new(work);
    let (start, mut history) = state.resume(&mut net, &mut opt, env)?;

    let steps = dataset.train.len().div_ceil(spec.batch_size);
    let total_steps = (steps * spec.epochs).max(1);
    for epoch in start..spec.epochs {
        let started = Instant::now();
        opt.lr = match &spec.lr_schedule {
            Some(s) => s.lr(spec.optimizer.lr, epoch, spec.epochs),
            None => spec.optimizer.lr,
        };
        let epoch_run = EpochRun {
            spec,
            env,
            batcher: &batcher,
            dataset: &dataset,
            epoch,
            steps,
            total_steps,
        };
        let Some(tally) = epoch_run.train(&mut net, &mut opt, on_event, should_stop)? else {
            return Ok(Outcome::Cancelled);
        };
        let test_accuracy = evaluate_net(&mut net, &batcher, &dataset.test, env.device)?.0;
        let record = EpochRecord {
            epoch: epoch + 1,
            loss: tally.loss_sum / tally.seen.max(1) as f64,
            train_accuracy: tally.correct as f64 / tally.seen.max(1) as f64,
            test_accuracy,
            seconds: started.elapsed().as_secs_f64(),
        };
        history.push(record.clone());
        state.save(&net, &opt, epoch + 1, &history)?;
        let progress = Progress {
            epoch: epoch + 1,
            epochs: spec.epochs,
            step: steps,
            steps,
            fraction: ((epoch + 1) * steps) as f64 / total_steps as f64,
            loss: record.loss,
        };
        if on_event(Event::Epoch(&progress, &history)) == Control::Stop {
            return Ok(Outcome::Cancelled);
        }
    }
    Ok(Outcome::Finished {
        weights: net.state_dict()?,
        manifest: Box::new(finished_manifest(spec, &plan, &history)),
        history,
    })
}

/// The job's dataset, cut to its limits, and the batcher that normalises
/// its images as the manifest says.
fn open_dataset(spec: &JobSpec, plan: &Plan, env: &Env) -> Result<(Dataset, Batcher)> {
    let mut dataset: Dataset = data::open(
        env.datasets_dir,
        &spec.dataset,
        &plan.manifest,
        spec.test_fraction.unwrap_or(0.2),
    )?;
    if let Some(n) = spec.train_limit {
        dataset.train.truncate(n);
    }
    if let Some(n) = spec.test_limit {
        dataset.test.truncate(n);
    }
    let (mean, std) = plan.manifest.normalisation();
    let batcher = Batcher {
        channels: plan.manifest.input.channels,
        mean,
        std,
    };
    Ok((dataset, batcher))
}

/// The manifest of the trained model: the plan's, with how it was trained.
fn finished_manifest(spec: &JobSpec, plan: &Plan, history: &[EpochRecord]) -> Manifest {
    let mut manifest = plan.manifest.clone();
    manifest.extra.insert(
        "training".into(),
        json!({
            "by": "convscope",
            "dataset": spec.dataset,
            "epochs": spec.epochs,
            "batch_size": spec.batch_size,
            "optimizer": spec.optimizer,
            "seed": spec.seed,
            "init_from": spec.init_from,
            "freeze": spec.freeze,
            "history": history,
        }),
    );
    manifest
}

/// Loss and accuracy summed over an epoch's steps.
struct Tally {
    loss_sum: f64,
    correct: usize,
    seen: usize,
}

/// One epoch of a job: what its steps need to know.
struct EpochRun<'a> {
    spec: &'a JobSpec,
    env: &'a Env<'a>,
    batcher: &'a Batcher,
    dataset: &'a Dataset,
    epoch: usize,
    steps: usize,
    total_steps: usize,
}

impl EpochRun<'_> {
    /// Every step of the epoch; `None` when stopped.
    fn train(
        &self,
        net: &mut TrainNet,
        opt: &mut Optimizer,
        on_event: &mut dyn FnMut(Event) -> Control,
        should_stop: &dyn Fn() -> bool,
    ) -> Result<Option<Tally>> {
        let (spec, epoch) = (self.spec, self.epoch);
        let every = spec.progress_every.unwrap_or(20);
        // Per-epoch generators: a resumed epoch draws what it would have.
        let mut order: Vec<usize> = (0..self.dataset.train.len()).collect();
        let mut rng = Rng::new(spec.seed ^ (0x5EED_0000 + epoch as u64));
        data::shuffle(&mut order, &mut rng);
        let mut tally = Tally {
            loss_sum: 0.0,
            correct: 0,
            seen: 0,
        };
        for (step, idx) in order.chunks(spec.batch_size).enumerate() {
            let (x, y) = self.batcher.batch(
                &self.dataset.train,
                idx,
                spec.augment,
                Some(&mut rng),
                self.env.device,
            )?;
            let logits = net.forward(&x, Some(&mut rng))?;
            let loss = self.regularised(cross_entropy(&logits, &y)?, net)?;
            let grads = loss.backward()?;
            opt.step(net.params(), &grads)?;
            let predicted = argmax(&logits)?;
            let labels = y.to_vec1::<u32>()?;
            tally.correct += predicted
                .iter()
                .zip(&labels)
                .filter(|(a, b)| a == b)
                .count();
            tally.seen += idx.len();
            tally.loss_sum += loss.to_scalar::<f32>()? as f64 * idx.len() as f64;
            let done = step + 1;
            if should_stop() {
                return Ok(None);
            }
            if done % every == 0 || done == self.steps {
                let progress = Progress {
                    epoch: epoch + 1,
                    epochs: spec.epochs,
                    step: done,
                    steps: self.steps,
                    fraction: (epoch * self.steps + done) as f64 / self.total_steps as f64,
                    loss: tally.loss_sum / tally.seen as f64,
                };
                if on_event(Event::Step(&progress)) == Control::Stop {
                    return Ok(None);
                }
            }
        }
        Ok(Some(tally))
    }

    /// The loss with the job's L1 and L2 penalties on every parameter.
    fn regularised(&self, mut loss: Tensor, net: &TrainNet) -> Result<Tensor> {
        let (l1, l2) = (self.spec.l1, self.spec.l2);
        if l1 > 0.0 || l2 > 0.0 {
            for p in net.params() {
                let w = p.var.as_tensor();
                if l1 > 0.0 {
                    loss = (loss + (w.abs()?.sum_all()? * l1)?)?;
                }
                if l2 > 0.0 {
                    loss = (loss + (w.sqr()?.sum_all()? * l2)?)?;
                }
            }
        }
        Ok(loss)
    }
}

/// The job's work directory: the last completed epoch's weights, optimiser
/// moments and history.
struct WorkDir {
    state: PathBuf,
    weights: PathBuf,
    optim: PathBuf,
}

impl WorkDir {
    fn new(work: &Path) -> Self {
        Self {
            state: work.join("resume.json"),
            weights: work.join("weights.safetensors"),
            optim: work.join("optimizer.safetensors"),
        }
    }

    /// Restores the last completed epoch, if there is one: the epoch to
    /// start from and the history so far.
    fn resume(
        &self,
        net: &mut TrainNet,
        opt: &mut Optimizer,
        env: &Env,
    ) -> Result<(usize, Vec<EpochRecord>)> {
        let Ok(text) = std::fs::read_to_string(&self.state) else {
            return Ok((0, Vec::new()));
        };
        let resume: Resume = serde_json::from_str(&text)
            .map_err(|e| Error::Dataset(format!("corrupt resume state: {e}")))?;
        let weights = candle_core::safetensors::load(&self.weights, env.device)?;
        for p in net.params() {
            if let Some(t) = weights.get(&p.name) {
                p.var.set(t)?;
            }
        }
        for (name, var) in net.buffers() {
            if let Some(t) = weights.get(name) {
                var.set(t)?;
            }
        }
        opt.restore(
            candle_core::safetensors::load(&self.optim, env.device)?,
            env.device,
        )?;
        net.set_batches_tracked(resume.batches_tracked);
        Ok((resume.epoch, resume.history))
    }

    /// Writes the epoch's resumable state, weights before the record that
    /// points at them.
    fn save(
        &self,
        net: &TrainNet,
        opt: &Optimizer,
        epoch: usize,
        history: &[EpochRecord],
    ) -> Result<()> {
        save_tensors(&self.weights, &net.state_dict()?)?;
        save_tensors(&self.optim, &opt.state()?)?;
        let resume = Resume {
            epoch,
            history: history.to_vec(),
            batches_tracked: net.batches_tracked(),
        };
        write_atomic(
            &self.state,
            serde_json::to_string(&resume)
                .expect("serialises")
                .as_bytes(),
        )
    }
}

/// The epoch snapshot written by [`run`] in `work` (weights of the last
/// completed epoch), for `model_name@epoch-N`.
pub fn last_snapshot(work: &Path) -> PathBuf {
    work.join("weights.safetensors")
}
