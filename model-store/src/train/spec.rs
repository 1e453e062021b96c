//! A training job's body: the typed spec, its defaults, and its parsing
//! (unknown fields and wrong types listed at once).

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::data::Augment;
use super::optim::OptimizerSpec;
use crate::manifest::{InputSpec, validate_model_name};

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
        kind: super::optim::OptimizerKind::Adam,
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

impl JobSpec {
    /// The learning rate of each epoch, in order, when a schedule moves it
    /// (the training plot draws it); `None` for a constant rate.
    pub fn learning_rates(&self) -> Option<Vec<f64>> {
        let schedule = self.lr_schedule.as_ref()?;
        Some(
            (0..self.epochs)
                .map(|e| schedule.lr(self.optimizer.lr, e, self.epochs))
                .collect(),
        )
    }

    /// The problems the body has on its own, before any model or dataset
    /// is looked at: names and hyper-parameters out of range.
    pub fn problems(&self) -> Vec<String> {
        let spec = self;
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
        p
    }
}
