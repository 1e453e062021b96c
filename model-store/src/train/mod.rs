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
mod epochs;
mod evaluate;
pub mod net;
pub mod optim;
mod plan;
mod spec;

pub use crate::rng::Rng;
pub use epochs::{
    Control, EpochRecord, Event, Outcome, Progress, last_snapshot, run, safetensors_bytes,
};
pub use evaluate::{ClassScores, Evaluation, evaluate, evaluate_batch, score};
pub use plan::{Env, Plan, plan};
pub use spec::{JobSpec, LrSchedule, MAX_BATCH, MAX_EPOCHS, cnn_a_layers, parse};
