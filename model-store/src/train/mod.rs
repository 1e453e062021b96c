//! Training: a job description, its validation, and the loop that runs it.
//!
//! - [`data`]: MNIST, CIFAR-10 and ImageFolder datasets, seeded batches,
//!   augmentation;
//! - [`net`]: the module tree with `Var` parameters and training-mode
//!   batch norm and dropout; freezing;
//! - [`optim`]: SGD (momentum, Nesterov, weight decay) and Adam/AdamW with
//!   PyTorch's update rules.
//!
//! [`run`] trains epoch by epoch, reporting progress through a callback
//! that can also cancel, and leaves after every epoch a resumable state
//! (weights, optimiser moments, history) written atomically in the job's
//! work directory, so a job interrupted by a crash resumes from its last
//! completed epoch.

pub mod data;
pub mod net;
pub mod optim;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::graph::Network;
use crate::manifest::{InputSpec, Manifest, validate_model_name};
use crate::store::ModelStore;

pub use crate::inspect::saliency::Gaussian as Rng;
use data::{Augment, Batcher, Dataset, DatasetInfo};
use net::{TrainNet, argmax, cross_entropy};
use optim::{Optimizer, OptimizerSpec};

/// The course's CNN_A, the architecture `"cnn_a"` names.
pub fn cnn_a_layers() -> Vec<Value> {
    serde_json::from_str(
        r#"[
  {"name": "conv1", "type": "conv2d", "in_channels": 1, "out_channels": 32, "kernel_size": 3},
  {"name": "pool1", "type": "max_pool2d", "kernel_size": 2},
  {"name": "relu1", "type": "relu"},
  {"name": "conv2", "type": "conv2d", "in_channels": 32, "out_channels": 64, "kernel_size": 3},
  {"name": "pool2", "type": "max_pool2d", "kernel_size": 2},
  {"name": "relu2", "type": "relu"},
  {"name": "dropout1", "type": "dropout", "p": 0.25},
  {"name": "flatten", "type": "flatten"},
  {"name": "fc1", "type": "linear", "in_features": 1600, "out_features": 128},
  {"name": "relu3", "type": "relu"},
  {"name": "dropout2", "type": "dropout", "p": 0.5},
  {"name": "fc2", "type": "linear", "in_features": 128, "out_features": 64},
  {"name": "fc3", "type": "linear", "in_features": 64, "out_features": 10},
  {"name": "relu4", "type": "relu"}
]"#,
    )
    .expect("CNN_A layers are valid JSON")
}

/// Learning-rate schedule, stepped once per epoch as PyTorch's schedulers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum LrSchedule {
    /// `StepLR`: multiply by `gamma` every `step_size` epochs.
    Step {
        /// Epochs between decays.
        step_size: usize,
        /// Factor (default 0.1).
        #[serde(default = "default_gamma")]
        gamma: f64,
    },
    /// `CosineAnnealingLR` with `T_max` = the job's epochs.
    Cosine {
        /// Floor (default 0).
        #[serde(default)]
        eta_min: f64,
    },
}

fn default_gamma() -> f64 {
    0.1
}

impl LrSchedule {
    /// The learning rate of `epoch` (0-based) out of `epochs`.
    pub fn lr(&self, base: f64, epoch: usize, epochs: usize) -> f64 {
        match self {
            LrSchedule::Step { step_size, gamma } => {
                base * gamma.powi((epoch / (*step_size).max(1)) as i32)
            }
            LrSchedule::Cosine { eta_min } => {
                let t = epoch as f64 / epochs.max(1) as f64;
                eta_min + (base - eta_min) * (1.0 + (std::f64::consts::PI * t).cos()) / 2.0
            }
        }
    }
}

/// A training job as `POST /jobs` and `convscope train` take it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Name of the model the job produces.
    pub model_name: String,
    /// `"cnn_a"`, a zoo architecture (`"resnet20-cifar"`), or
    /// `{"layers": [...]}` (sequential); omitted with `init_from`.
    #[serde(default)]
    pub architecture: Option<Value>,
    /// A name from `GET /datasets`.
    pub dataset: String,
    /// Epochs (default 1).
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    /// Images per step (default 64).
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// The optimiser (default Adam, lr 1e-3).
    #[serde(default = "default_optimizer")]
    pub optimizer: OptimizerSpec,
    /// Training-time augmentation.
    #[serde(default)]
    pub augment: Augment,
    /// Start from this model's weights.
    #[serde(default)]
    pub init_from: Option<String>,
    /// Layers whose weights stay as they are.
    #[serde(default)]
    pub freeze: Vec<String>,
    /// Seed of initialisation, shuffling, augmentation and dropout.
    #[serde(default)]
    pub seed: u64,
    /// L1 penalty weight on every trained parameter, added to the loss.
    #[serde(default)]
    pub l1: f64,
    /// L2 penalty weight on every trained parameter, added to the loss.
    #[serde(default)]
    pub l2: f64,
    /// Learning-rate schedule (default constant).
    #[serde(default)]
    pub lr_schedule: Option<LrSchedule>,
    /// Train on the first N training images only.
    #[serde(default)]
    pub train_limit: Option<usize>,
    /// Test on the first N test images only.
    #[serde(default)]
    pub test_limit: Option<usize>,
    /// ImageFolder datasets: the fraction held out for testing (default 0.2).
    #[serde(default)]
    pub test_fraction: Option<f64>,
    /// Input size and normalisation of a new model (default: the dataset's).
    #[serde(default)]
    pub input: Option<InputSpec>,
    /// Register every epoch's weights as `model_name@epoch-N` (default true).
    #[serde(default = "yes")]
    pub epoch_snapshots: bool,
    /// Report progress every N steps (default 20).
    #[serde(default)]
    pub progress_every: Option<usize>,
}

fn default_epochs() -> usize {
    1
}
fn default_batch() -> usize {
    64
}
fn yes() -> bool {
    true
}
fn default_optimizer() -> OptimizerSpec {
    OptimizerSpec {
        kind: "adam".into(),
        lr: 1e-3,
        momentum: 0.0,
        nesterov: false,
        weight_decay: None,
        betas: None,
        eps: None,
    }
}

/// Most epochs one job may ask for.
pub const MAX_EPOCHS: usize = 1000;
/// Largest batch.
pub const MAX_BATCH: usize = 4096;

/// The known fields of a job body, for "unknown field" problems.
const FIELDS: &[&str] = &[
    "model_name",
    "architecture",
    "dataset",
    "epochs",
    "batch_size",
    "optimizer",
    "augment",
    "init_from",
    "freeze",
    "seed",
    "l1",
    "l2",
    "lr_schedule",
    "train_limit",
    "test_limit",
    "test_fraction",
    "input",
    "epoch_snapshots",
    "progress_every",
];

/// Parses a job body, listing every problem serde finds field by field
/// (unknown fields, wrong types) instead of stopping at the first.
pub fn parse(body: &Value) -> std::result::Result<JobSpec, Vec<String>> {
    let Some(obj) = body.as_object() else {
        return Err(vec!["the job body must be a JSON object".into()]);
    };
    let mut problems: Vec<String> = obj
        .keys()
        .filter(|k| !FIELDS.contains(&k.as_str()))
        .map(|k| format!("unknown field '{k}'; fields: {}", FIELDS.join(", ")))
        .collect();
    // Type-check each known field on its own, so that all bad ones are named.
    let template = json!({"model_name": "x", "dataset": "x"});
    for (k, v) in obj.iter().filter(|(k, _)| FIELDS.contains(&k.as_str())) {
        let mut probe = template.clone();
        probe[k] = v.clone();
        if let Err(e) = serde_json::from_value::<JobSpec>(probe) {
            problems.push(format!("{k}: {e}"));
        }
    }
    for required in ["model_name", "dataset"] {
        if !obj.contains_key(required) {
            problems.push(format!("missing field '{required}'"));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    serde_json::from_value(body.clone()).map_err(|e| vec![e.to_string()])
}

/// Where a job reads datasets and source models.
pub struct Env<'a> {
    /// The model store (for `init_from`: the model and its weights file).
    pub models: &'a ModelStore,
    /// The datasets directory.
    pub datasets_dir: &'a Path,
    /// Where training runs.
    pub device: &'a Device,
}

/// A validated job: the manifest it will produce and where its weights start.
pub struct Plan {
    /// The new model's manifest.
    pub manifest: Manifest,
    /// The network, initialised (fresh or from `init_from`).
    pub network: Network,
    /// Tensors initialised rather than read from `init_from` (a new head).
    pub initialised: Vec<String>,
    /// The dataset as listed.
    pub dataset: DatasetInfo,
}

fn dataset_defaults(info: &DatasetInfo) -> Option<InputSpec> {
    let (channels, h, w, mean, std) = match info.format {
        "mnist" => (1, 28, 28, vec![0.1307], vec![0.3081]),
        "cifar10" => (
            3,
            32,
            32,
            vec![0.4914, 0.4822, 0.4465],
            vec![0.2470, 0.2435, 0.2616],
        ),
        _ => return None,
    };
    Some(InputSpec {
        channels,
        height: h,
        width: w,
        mean: Some(mean),
        std: Some(std),
        resize: None,
        center_crop: None,
    })
}

/// Checks a job against the models and datasets it names, listing every
/// problem; on success, the manifest and initial network it will train.
pub fn plan(spec: &JobSpec, env: &Env) -> std::result::Result<Plan, Vec<String>> {
    let mut p = Vec::new();
    if let Err(e) = validate_model_name(&spec.model_name) {
        p.push(format!("model_name: {e}"));
    }
    if spec.epochs == 0 || spec.epochs > MAX_EPOCHS {
        p.push(format!(
            "epochs must be in 1..={MAX_EPOCHS}, got {}",
            spec.epochs
        ));
    }
    if spec.batch_size == 0 || spec.batch_size > MAX_BATCH {
        p.push(format!(
            "batch_size must be in 1..={MAX_BATCH}, got {}",
            spec.batch_size
        ));
    }
    p.extend(spec.optimizer.problems());
    for (name, v) in [("l1", spec.l1), ("l2", spec.l2)] {
        if !(v.is_finite() && (0.0..=1.0).contains(&v)) {
            p.push(format!("{name} must be in [0, 1], got {v}"));
        }
    }
    if spec.augment.random_crop_padding > 64 {
        p.push(format!(
            "augment.random_crop_padding must be in 0..=64, got {}",
            spec.augment.random_crop_padding
        ));
    }
    match &spec.lr_schedule {
        Some(LrSchedule::Step { step_size, gamma }) => {
            if *step_size == 0 {
                p.push("lr_schedule.step_size must be at least 1".into());
            }
            if !(gamma.is_finite() && *gamma > 0.0 && *gamma <= 1.0) {
                p.push(format!("lr_schedule.gamma must be in (0, 1], got {gamma}"));
            }
        }
        Some(LrSchedule::Cosine { eta_min })
            if !(eta_min.is_finite() && *eta_min >= 0.0 && *eta_min < spec.optimizer.lr) =>
        {
            p.push(format!(
                "lr_schedule.eta_min must be in [0, optimizer.lr), got {eta_min}"
            ));
        }
        Some(LrSchedule::Cosine { .. }) => {}
        None => {}
    }
    if let Some(f) = spec.test_fraction
        && !(f > 0.0 && f < 1.0)
    {
        p.push(format!("test_fraction must be in (0, 1), got {f}"));
    }
    if spec.train_limit == Some(0) || spec.test_limit == Some(0) {
        p.push("train_limit and test_limit must be at least 1".into());
    }
    if spec.progress_every == Some(0) {
        p.push("progress_every must be at least 1".into());
    }

    let datasets = data::list(env.datasets_dir);
    let dataset = datasets.iter().find(|d| d.name == spec.dataset).cloned();
    if dataset.is_none() {
        p.push(format!(
            "dataset: no dataset '{}'; available: {}",
            spec.dataset,
            datasets
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }

    // The architecture, its input, and where the weights start.
    let source = match &spec.init_from {
        Some(name) => match env.models.get(name) {
            Some(m) => Some(m),
            None => {
                p.push(format!(
                    "init_from: no model '{name}'; GET /models lists them"
                ));
                None
            }
        },
        None => None,
    };
    if spec.init_from.is_some() && spec.architecture.is_some() {
        p.push(
            "give architecture or init_from, not both (init_from brings its architecture)".into(),
        );
    }
    if spec.init_from.is_none() && spec.architecture.is_none() {
        p.push("architecture is needed (\"cnn_a\", a zoo name such as \"resnet20-cifar\", or {\"layers\": [...]}) unless init_from names a model".into());
    }
    // The architecture's form, whether or not the dataset exists.
    let zoo: Vec<&str> = crate::arch::ARCHITECTURES
        .iter()
        .filter(|a| **a != "sequential")
        .copied()
        .collect();
    match &spec.architecture {
        Some(Value::String(s)) if s != "cnn_a" && !zoo.contains(&s.as_str()) => p.push(format!(
            "architecture: unknown '{s}'; use \"cnn_a\", {{\"layers\": [...]}} or one of {}",
            zoo.join(", ")
        )),
        Some(Value::Object(o)) if !o.contains_key("layers") => {
            p.push("architecture: an object must have `layers`".into())
        }
        Some(v @ (Value::Null | Value::Bool(_) | Value::Number(_) | Value::Array(_))) => p.push(
            format!("architecture must be a name or {{\"layers\": [...]}}, got {v}"),
        ),
        _ => {}
    }
    let Some(dataset) = dataset else {
        return Err(p);
    };
    let classes = dataset.classes.clone();
    let manifest_json = if let Some(src) = &source {
        let mut m = serde_json::to_value(&src.manifest).expect("manifests serialise");
        m["name"] = json!(spec.model_name);
        m["classes"] = json!(classes);
        for k in ["test_accuracy", "training", "description"] {
            if let Some(o) = m.as_object_mut() {
                o.remove(k);
            }
        }
        Some(m)
    } else {
        // CNN_A takes MNIST digits whatever the dataset; other new
        // models take the dataset's images.
        let is_cnn_a = spec.architecture == Some(Value::String("cnn_a".into()));
        let input = spec.input.clone().or_else(|| {
            if is_cnn_a {
                dataset_defaults(&DatasetInfo {
                    format: "mnist",
                    ..dataset.clone()
                })
            } else {
                dataset_defaults(&dataset)
            }
        });
        match (&spec.architecture, input) {
            (_, None) => {
                p.push(format!(
                    "input is needed: dataset '{}' is an ImageFolder, so give input {{channels, height, width, mean, std}}",
                    dataset.name
                ));
                None
            }
            (Some(Value::String(s)), Some(input)) if s == "cnn_a" => Some(json!({
                "name": spec.model_name, "architecture": "sequential",
                "layers": cnn_a_layers(), "input": input, "classes": classes,
            })),
            (Some(Value::String(s)), Some(input)) if zoo.contains(&s.as_str()) => Some(
                json!({"name": spec.model_name, "architecture": s, "input": input, "classes": classes}),
            ),
            (Some(Value::Object(o)), Some(input)) if o.contains_key("layers") => Some(json!({
                "name": spec.model_name, "architecture": "sequential",
                "layers": o["layers"], "input": input, "classes": classes,
            })),
            // Reported above.
            _ => None,
        }
    };
    let Some(manifest_json) = manifest_json else {
        return Err(p);
    };
    let manifest = match Manifest::from_json(manifest_json.to_string().as_bytes()) {
        Ok(m) => m,
        Err(e) => {
            p.push(format!("architecture: {e}"));
            return Err(p);
        }
    };
    if let Some(shape) = dataset.shape {
        let i = &manifest.input;
        if (shape[1], shape[2]) != (i.height, i.width) {
            p.push(format!(
                "dataset '{}' has {}x{} images but the model takes {}x{}",
                dataset.name, shape[1], shape[2], i.height, i.width
            ));
        }
    }
    // Build the network the job will train, to check that the layers chain,
    // that the head fits the classes, and that `freeze` names real layers.
    let mut ck = match (&spec.init_from, &source) {
        (Some(name), Some(_)) => {
            let path = env.models.path().join(format!("{name}.safetensors"));
            match Checkpoint::from_file(&path, env.device) {
                Ok(ck) => ck.initialising_missing(spec.seed),
                Err(e) => {
                    p.push(format!("init_from: cannot read its weights: {e}"));
                    return Err(p);
                }
            }
        }
        _ => Checkpoint::fresh(env.device, spec.seed),
    };
    let built = crate::arch::build(&manifest, &mut ck).and_then(|root| {
        let s = &manifest.input;
        Network::new(root, (s.channels, s.height, s.width))
    });
    let network = match built {
        Ok(n) => n,
        Err(e) => {
            p.push(format!("architecture: {e}"));
            return Err(p);
        }
    };
    if network.outputs() != classes.len() {
        p.push(format!(
            "the network outputs {} values but dataset '{}' has {} classes",
            network.outputs(),
            dataset.name,
            classes.len()
        ));
    }
    let initialised = ck.initialised().to_vec();
    if spec.init_from.is_some() {
        // Only the head may be new: anything else means the checkpoint and
        // the architecture disagree.
        let head = network
            .layers()
            .iter()
            .rev()
            .find(|l| l.kind == "linear")
            .map(|l| l.name.clone())
            .unwrap_or_default();
        let strays: Vec<&String> = initialised
            .iter()
            .filter(|n| !n.starts_with(&format!("{head}.")))
            .collect();
        if !strays.is_empty() {
            p.push(format!(
                "init_from: its checkpoint lacks {strays:?}, which only a new head may lack"
            ));
        }
        if spec
            .freeze
            .iter()
            .any(|f| net::is_frozen(&format!("{head}.weight"), std::slice::from_ref(f)))
            && !initialised.is_empty()
        {
            p.push(format!(
                "freeze: the head '{head}' is new (the classes changed), so it cannot be frozen"
            ));
        }
    }
    for f in &spec.freeze {
        if network.layer(f).is_none() {
            p.push(format!(
                "freeze: no layer '{f}'; layers: {}",
                network
                    .layers()
                    .iter()
                    .map(|l| l.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    if !p.is_empty() {
        return Err(p);
    }
    Ok(Plan {
        manifest,
        network,
        initialised,
        dataset,
    })
}

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
    let input = &plan.manifest.input;
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
        channels: input.channels,
        mean,
        std,
    };
    let mut net = TrainNet::new(&plan.network, &spec.freeze)?;
    let mut opt = Optimizer::new(&spec.optimizer);

    // Resume after the last completed epoch, if there is one.
    let state_path = work.join("resume.json");
    let weights_path = work.join("weights.safetensors");
    let optim_path = work.join("optimizer.safetensors");
    let mut history = Vec::new();
    let mut start = 0;
    if let Ok(text) = std::fs::read_to_string(&state_path) {
        let resume: Resume = serde_json::from_str(&text)
            .map_err(|e| Error::Dataset(format!("corrupt resume state: {e}")))?;
        let weights = candle_core::safetensors::load(&weights_path, env.device)?;
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
            candle_core::safetensors::load(&optim_path, env.device)?,
            env.device,
        )?;
        net.set_batches_tracked(resume.batches_tracked);
        start = resume.epoch;
        history = resume.history;
    }

    let n = dataset.train.len();
    let bs = spec.batch_size;
    let steps = n.div_ceil(bs);
    let every = spec.progress_every.unwrap_or(20);
    let total_steps = (steps * spec.epochs).max(1);
    for epoch in start..spec.epochs {
        let started = Instant::now();
        opt.lr = match &spec.lr_schedule {
            Some(s) => s.lr(spec.optimizer.lr, epoch, spec.epochs),
            None => spec.optimizer.lr,
        };
        // Per-epoch generators: a resumed epoch draws what it would have.
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = Rng::new(spec.seed ^ (0x5EED_0000 + epoch as u64));
        data::shuffle(&mut order, &mut rng);
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
        for (step, idx) in order.chunks(bs).enumerate() {
            let (x, y) = batcher.batch(
                &dataset.train,
                idx,
                spec.augment,
                Some(&mut rng),
                env.device,
            )?;
            let logits = net.forward(&x, Some(&mut rng))?;
            let mut loss = cross_entropy(&logits, &y)?;
            if spec.l1 > 0.0 || spec.l2 > 0.0 {
                for p in net.params() {
                    let w = p.var.as_tensor();
                    if spec.l1 > 0.0 {
                        loss = (loss + (w.abs()?.sum_all()? * spec.l1)?)?;
                    }
                    if spec.l2 > 0.0 {
                        loss = (loss + (w.sqr()?.sum_all()? * spec.l2)?)?;
                    }
                }
            }
            let grads = loss.backward()?;
            opt.step(net.params(), &grads)?;
            let predicted = argmax(&logits)?;
            let labels = y.to_vec1::<u32>()?;
            correct += predicted
                .iter()
                .zip(&labels)
                .filter(|(a, b)| a == b)
                .count();
            seen += idx.len();
            loss_sum += loss.to_scalar::<f32>()? as f64 * idx.len() as f64;
            let done = step + 1;
            if should_stop() {
                return Ok(Outcome::Cancelled);
            }
            if done % every == 0 || done == steps {
                let progress = Progress {
                    epoch: epoch + 1,
                    epochs: spec.epochs,
                    step: done,
                    steps,
                    fraction: (epoch * steps + done) as f64 / total_steps as f64,
                    loss: loss_sum / seen as f64,
                };
                if on_event(Event::Step(&progress)) == Control::Stop {
                    return Ok(Outcome::Cancelled);
                }
            }
        }
        let test_accuracy = evaluate_net(&mut net, &batcher, &dataset.test, env.device)?.0;
        let record = EpochRecord {
            epoch: epoch + 1,
            loss: loss_sum / seen.max(1) as f64,
            train_accuracy: correct as f64 / seen.max(1) as f64,
            test_accuracy,
            seconds: started.elapsed().as_secs_f64(),
        };
        history.push(record.clone());
        // The epoch's resumable state, weights before the record that
        // points at them.
        save_tensors(&weights_path, &net.state_dict()?)?;
        save_tensors(&optim_path, &opt.state()?)?;
        let resume = Resume {
            epoch: epoch + 1,
            history: history.clone(),
            batches_tracked: net.batches_tracked(),
        };
        write_atomic(
            &state_path,
            serde_json::to_string(&resume)
                .expect("serialises")
                .as_bytes(),
        )?;
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
    Ok(Outcome::Finished {
        weights: net.state_dict()?,
        manifest: Box::new(manifest),
        history,
    })
}

/// The epoch snapshot written by [`run`] in `work` (weights of the last
/// completed epoch), for `model_name@epoch-N`.
pub fn last_snapshot(work: &Path) -> PathBuf {
    work.join("weights.safetensors")
}

/// Accuracy and per-image predictions of `net` on `images`, in eval mode.
fn evaluate_net(
    net: &mut TrainNet,
    batcher: &Batcher,
    images: &data::Images,
    device: &Device,
) -> Result<(f64, Vec<u32>)> {
    let mut predictions = Vec::with_capacity(images.len());
    let all: Vec<usize> = (0..images.len()).collect();
    for idx in all.chunks(256) {
        let (x, _) = batcher.batch(images, idx, Augment::default(), None, device)?;
        let logits = net.forward(&x, None)?;
        predictions.extend(argmax(&logits)?);
    }
    let correct = predictions
        .iter()
        .zip(&images.labels)
        .filter(|(a, b)| a == b)
        .count();
    Ok((correct as f64 / images.len().max(1) as f64, predictions))
}

/// Confusion matrix and per-class precision/recall of a loaded model.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Evaluation {
    /// Fraction correct.
    pub accuracy: f64,
    /// Images evaluated.
    pub count: usize,
    /// `M[true][predicted]` counts.
    pub confusion_matrix: Vec<Vec<u64>>,
    /// Per class: precision, recall, support.
    pub per_class: Vec<ClassScores>,
    /// Class names, the matrix's row and column order.
    pub classes: Vec<String>,
}

/// One class's scores.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClassScores {
    /// Label.
    pub label: String,
    /// Of the images predicted as this class, the fraction that are (0 when none were).
    pub precision: f64,
    /// Of the images of this class, the fraction predicted so (0 when there are none).
    pub recall: f64,
    /// Images of this class.
    pub support: u64,
}

/// Scores predictions against labels.
pub fn score(labels: &[u32], predicted: &[u32], classes: &[String]) -> Evaluation {
    let k = classes.len();
    let mut m = vec![vec![0u64; k]; k];
    for (&t, &p) in labels.iter().zip(predicted) {
        if (t as usize) < k && (p as usize) < k {
            m[t as usize][p as usize] += 1;
        }
    }
    let per_class = (0..k)
        .map(|c| {
            let tp = m[c][c] as f64;
            let support: u64 = m[c].iter().sum();
            let predicted: u64 = m.iter().map(|row| row[c]).sum();
            ClassScores {
                label: classes[c].clone(),
                precision: if predicted == 0 {
                    0.0
                } else {
                    tp / predicted as f64
                },
                recall: if support == 0 {
                    0.0
                } else {
                    tp / support as f64
                },
                support,
            }
        })
        .collect();
    let correct: u64 = (0..k).map(|c| m[c][c]).sum();
    Evaluation {
        accuracy: correct as f64 / labels.len().max(1) as f64,
        count: labels.len(),
        confusion_matrix: m,
        per_class,
        classes: classes.to_vec(),
    }
}

/// Evaluates a loaded model on a dataset's test split (the first `limit`
/// images), preprocessed as the model's manifest says.
pub fn evaluate(
    model: &crate::model::LoadedModel,
    datasets_dir: &Path,
    dataset: &str,
    limit: Option<usize>,
) -> Result<Evaluation> {
    let input = &model.manifest.input;
    let mut ds = data::open(datasets_dir, dataset, &model.manifest, 0.2)?;
    if ds.test.shape.1 != input.height || ds.test.shape.2 != input.width {
        return Err(Error::Dataset(format!(
            "dataset '{dataset}' has {}x{} images but model '{}' takes {}x{}",
            ds.test.shape.1,
            ds.test.shape.2,
            model.name(),
            input.height,
            input.width
        )));
    }
    if ds.classes.len() != model.classes.len() {
        return Err(Error::Dataset(format!(
            "dataset '{dataset}' has {} classes but model '{}' outputs {}",
            ds.classes.len(),
            model.name(),
            model.classes.len()
        )));
    }
    if let Some(n) = limit {
        ds.test.truncate(n);
    }
    let (mean, std) = model.manifest.normalisation();
    let batcher = Batcher {
        channels: input.channels,
        mean,
        std,
    };
    let mut predicted = Vec::with_capacity(ds.test.len());
    let all: Vec<usize> = (0..ds.test.len()).collect();
    for idx in all.chunks(256) {
        let (x, _) = batcher.batch(&ds.test, idx, Augment::default(), None, &model.device)?;
        predicted.extend(argmax(&model.network.predict(&x)?)?);
    }
    Ok(score(&ds.test.labels, &predicted, &model.classes))
}
